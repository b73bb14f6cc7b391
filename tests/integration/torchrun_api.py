"""A user's own ``torchrun`` script using the Python API (run by ``test_torchrun.py``; also imported there).

It creates the process group itself, then trains, fits and evaluates a tiny Dyck model; the main
process saves the weights, the proxies and the results into the folder given as its argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import illusion_probe as ip
from illusion_probe.study import load_study
from illusion_probe.sweeps import sweep_simplifiers


def run(out: Path) -> None:
    """Train twice from one start (the two must agree), fit a sweep of every family, evaluate, save on the main process."""
    torch.manual_seed(0)
    study = load_study("dyck", "tiny")
    task = study.build_task()
    splits = task.make_splits(seed=0)
    model = ip.build_model(task, ip.ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, seed=0, device="cpu"))
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = ip.TrainConfig(max_steps=12, warmup_steps=2, batch_size=16, eval_every=6, eval_sequences=40, progress=False)
    history = ip.train(model, splits, config, task=task)
    trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(start)
    again = ip.train(model, splits, config, task=task)
    assert all(torch.equal(trained[name], tensor) for name, tensor in model.state_dict().items()), "not reproducible"
    assert [(r["step"], r["loss"], r["acc"]) for r in history] == [(r["step"], r["loss"], r["acc"]) for r in again]
    wanted = {
        **sweep_simplifiers(["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"], "pca", [1, 4]),
        **sweep_simplifiers(["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"], "kmeans", [2, 4]),
        **sweep_simplifiers(["blocks.0.hook_resid_pre"], "sae", [8], k=2, epochs=2, seed=0, data_parallel=True),
        **sweep_simplifiers(["blocks.0.hook_mlp_out"], "transcoder", [8], k=2, epochs=2, seed=0),
        **sweep_simplifiers(["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"], "mean_ablation"),
    }
    proxies = ip.fit_proxies(model, wanted, splits["train"], n_sequences=60)
    evaluated = ip.SplitSet([split.head(40) for split in splits.values()])
    results = ip.evaluate(model, proxies, evaluated, task, n_boot=50, difficulty_bins=2, progress=False)
    if ip.distributed.world().is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(out / "model.safetensors"))
        for index, proxy in enumerate(proxies.values()):
            proxy.save(out / f"proxy_{index}")
        results.to_json(out / "results.json")


if __name__ == "__main__":
    dist.init_process_group("gloo")  # the user's own group: illusion-probe joins it
    run(Path(sys.argv[1]))
    dist.destroy_process_group()
