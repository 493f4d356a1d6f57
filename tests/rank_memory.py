"""Run `lowbit ARGS...` and write to OUT (OUT.RANK under torchrun) the most tensor bytes the process held at
the engine's heaviest points: each Linear's solve, each exchange of Hessian rows, each layer's save.

    python tests/rank_memory.py OUT quantize MODEL -o FOLDER ...

Held bytes are the distinct storages of the tensors alive then (gc), a deterministic measure where a
process's resident set is not. Within a solve every rank makes the temporaries a single process makes
for the same Linear, so these points are where the two can differ.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch


def held_bytes() -> int:
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    if "RANK" in os.environ:
        out = out.with_name(f"{out.name}.{os.environ['RANK']}")
    from lowbit.cli import app
    from lowbit.quantize import distributed, driver, progress

    peak = {"bytes": 0, "where": None}

    def sampled(fn, where: str):
        def call(*a, **k):
            sample(where)
            return fn(*a, **k)
        return call

    def sample(where: str) -> None:
        held = held_bytes()
        if held > peak["bytes"]:
            peak.update(bytes=held, where=where)

    driver._solve_linear = sampled(driver._solve_linear, "solve")
    driver.save_layer = sampled(driver.save_layer, "save")
    progress.save_layer_tensors = sampled(progress.save_layer_tensors, "save")  # the calibrated loop's
    distributed.Ranks.send_to_primary = sampled(distributed.Ranks.send_to_primary, "save")
    # the first band of each Hessian's rows (the later ones hold as much): one gc scan per sum, not per band
    first_band = {"next": False}
    sum_rows, all_gather = distributed.Ranks.sum_rows, torch.distributed.all_gather

    def summing(self, *a, **k):
        first_band["next"] = True
        return sum_rows(self, *a, **k)

    def gathering(*a, **k):
        result = all_gather(*a, **k)
        if first_band["next"]:
            first_band["next"] = False
            sample("Hessian rows exchanged")
        return result

    distributed.Ranks.sum_rows, torch.distributed.all_gather = summing, gathering
    code = 0
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:
        code = e.code or 0
    out.write_text(json.dumps({"peak_bytes": peak["bytes"], "where": peak["where"], "exit_code": code}))
    sys.exit(code)


if __name__ == "__main__":
    main()
