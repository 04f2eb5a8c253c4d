"""Reads a run folder's TensorBoard event files with the `tensorboard` package and checks every
scalar against OUT/log.jsonl (what alignfuse logged): same steps, same values (as float32).

    python scripts/check-tensorboard.py runs/tiny     # needs `pip install tensorboard`
"""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = sys.argv[1]
acc = EventAccumulator(out, size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
logged = {}
for line in open(f"{out}/log.jsonl"):
    r = json.loads(line)
    if r["kind"] == "step":
        flat = {"loss": r["loss"], "lr": r["lr"], "alpha": r["alpha"], "grad_norm": r["grad_norm"],
                "pairs_per_s": r["pairs_per_s"]}
        flat.update({f"loss/{k}": v for k, v in r["losses"].items()})
        flat.update(r["metrics"])
        for k, v in flat.items():
            logged.setdefault(k, {})[r["step"]] = v
    else:
        def walk(v, path):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(x, f"{path}/{k}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                logged.setdefault(path, {})[r["step"]] = v
        walk(r["metrics"], r["split"])
assert set(tags) == set(logged), f"tags differ: {sorted(set(tags) ^ set(logged))}"
points = 0
for tag in tags:
    got = {e.step: e.value for e in acc.Scalars(tag)}
    assert len(got) == len(acc.Scalars(tag)), f"{tag}: a step appears twice"
    assert got.keys() == logged[tag].keys(), f"{tag}: steps differ"
    for step, v in logged[tag].items():
        assert got[step] == np.float32(v), f"{tag} step {step}: {got[step]} != {v}"
        points += 1
print(f"tensorboard reads {len(tags)} tags, {points} points, all equal to log.jsonl")
