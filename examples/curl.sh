#!/usr/bin/env bash
# The HTTP API with curl: a box prompt on an image, the answer and the mask (PNG) back.
#
#   medplib serve run --model tiny &
#   bash examples/curl.sh scan.png [http://127.0.0.1:8000]     # writes mask.png; needs curl, jq, base64
#
# The API key, if the server has one, comes from $MEDPLIB_API_KEY.
set -euo pipefail
image=${1:?usage: curl.sh IMAGE [BASE_URL]}
base=${2:-http://127.0.0.1:8000}
auth=()
if [ -n "${MEDPLIB_API_KEY:-}" ]; then auth=(-H "Authorization: Bearer ${MEDPLIB_API_KEY}"); fi

# The native route: base64 of the file, the question, region prompts; masks as PNG.
jq -n --rawfile b64 <(base64 -w0 "$image") '{
  image: $b64, question: "Please segment the region.", segment: true, max_new_tokens: 16,
  regions: [{kind: "box", x0: 10, y0: 10, x1: 40, y1: 30}], mask_encoding: "png"}' \
  | curl -sS --fail-with-body "${auth[@]}" -H "Content-Type: application/json" -d @- "$base/v1/predict" \
  > response.json
jq '{answer, num_generated_tokens, timings}' response.json
jq -r '.masks[0].png_base64' response.json | base64 -d > mask.png
echo "wrote mask.png"

# The OpenAI-compatible route, streamed: server-sent events, one piece of the answer each, masks in the last.
jq -n --rawfile b64 <(base64 -w0 "$image") '{
  messages: [{role: "user", content: [{type: "text", text: "What is this?"},
              {type: "image_url", image_url: {url: ("data:image/png;base64," + $b64)}}]}],
  max_tokens: 16, stream: true}' \
  | curl -sS -N --fail-with-body "${auth[@]}" -H "Content-Type: application/json" -d @- "$base/v1/chat/completions"
