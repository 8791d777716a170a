"""Ask the MedPLIB server with the official `openai` client: a box prompt, a mask back, decoded to a PNG; then
the same question streamed token by token, and a follow-up question about the same image.

    medplib serve run --model models:/medplib@champion          # or: --model tiny
    python examples/openai_client.py --image scan.png --box 10,20,120,140 --out mask.png

Needs only `pip install './client[openai]'` (the client distribution and the `openai` package; no torch). The API
key comes from --api-key or $MEDPLIB_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
from pathlib import Path

from openai import OpenAI

from medplib_client import decode_mask  # COCO RLE or PNG -> a bool (H, W) numpy array


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("MEDPLIB_API_KEY", "none"))
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--box", default="10,10,40,30", help="x0,y0,x1,y1 in image pixels")
    parser.add_argument("--question", default="Please segment the region.")
    parser.add_argument("--out", type=Path, default=Path("mask.png"))
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key)
    media = mimetypes.guess_type(args.image.name)[0] or "application/octet-stream"
    image_url = f"data:{media};base64," + base64.b64encode(args.image.read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": args.question},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        }
    ]
    x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    # Region prompts and mask options ride in the `medplib` extension of the request.
    medplib = {"boxes": [{"x0": x0, "y0": y0, "x1": x1, "y1": y1}], "segment": True, "mask_encoding": "rle"}
    reply = client.chat.completions.create(
        model="default", messages=messages, max_tokens=32, extra_body={"medplib": medplib}
    )
    print("answer:", reply.choices[0].message.content)
    masks = reply.model_extra["medplib"]["masks"]
    if masks:
        from PIL import Image

        mask = decode_mask(masks[0])
        Image.fromarray(mask.astype("uint8") * 255).save(args.out)
        print(
            f"mask: {mask.shape[1]}x{mask.shape[0]} px, {int(mask.sum())} inside, score {masks[0]['score']:.3f}"
        )
        print(f"wrote {args.out}")

    # Streaming: the answer arrives while it is generated; the masks come with the last chunk.
    print("streamed:", end=" ", flush=True)
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=32, stream=True, extra_body={"medplib": medplib}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # A follow-up: the conversation goes back with the answer; the image stays in the first message.
    messages += [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "How large is it?"},
    ]
    follow_up = client.chat.completions.create(model="default", messages=messages, max_tokens=32)
    print("follow-up:", follow_up.choices[0].message.content)


if __name__ == "__main__":
    main()
