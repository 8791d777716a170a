"""Volume throughput: slices/s answering one question about every slice of a volume, one slice per `Predictor`
call (encode + run for each slice) against the batched slice path (`predict_volume`: `batch` slices per
`Predictor.run`), on the same slices in one run. The runs are interleaved and the best of each kept, since the
machine is shared and interference only ever adds time.
Goal: batched / one-at-a-time >= 2.

    .venv/bin/python -m bench.volume_throughput [--preset tiny] [--slices 32] [--batch 8] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import print_figures
from medplib.data.volume import Volume, load_volume
from medplib.inference import Predictor
from medplib.volume_prediction import predict_volume
from medplib_datasets import files

QUESTION = "Please segment the brain."


def _volume(slices: int) -> Volume:
    """`slices` axial slices from the middle of the ITK real-subject T1 (else nilearn's template), RAS."""
    path = files.deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz")
    if path is None:
        path = files.package_dir("nilearn") / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    source = load_volume(path)
    ras = np.ascontiguousarray(source.ras())
    start = max(0, ras.shape[2] // 2 - slices // 2)
    return Volume(data=ras[:, :, start : start + slices], affine=np.eye(4), name=str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="model preset or directory")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="slices per Predictor.run on the batched path")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    predictor = Predictor.from_pretrained(args.preset)
    volume = _volume(args.slices)
    n = volume.num_slices(2)
    settings = {"max_new_tokens": args.max_new_tokens, "segment": True}

    def one_at_a_time() -> None:
        for k in range(n):
            predictor.predict(volume.display_slice(2, k), QUESTION, **settings)

    def batched() -> None:
        predict_volume(predictor, volume, QUESTION, axis=2, batch_size=args.batch, **settings)

    one_at_a_time()  # warm-up (first calls allocate)
    batched()
    times = {"one": [], "batched": []}
    for _ in range(args.repeats):
        for name, fn in (("one", one_at_a_time), ("batched", batched)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    one, many = n / min(times["one"]), n / min(times["batched"])
    print(
        f"{args.preset}: {n} slices of {volume.display_slice(2, 0).shape[:2]}, {args.max_new_tokens} new tokens, segment"
    )
    print(
        f"one slice per Predictor call: {one:.2f} slices/s; batched ({args.batch} a pass): {many:.2f} slices/s"
    )
    print_figures(
        [
            {"name": f"volume_slices_per_s_one_at_a_time_{args.preset}", "value": round(one, 3)},
            {"name": f"volume_slices_per_s_batched_{args.preset}", "value": round(many, 3)},
            {"name": f"volume_batched_speedup_{args.preset}", "value": round(many / one, 3), "goal": 2.0},
        ]
    )


if __name__ == "__main__":
    main()
