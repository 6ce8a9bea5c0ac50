"""Shared test helpers: load a method file and run a smoke fit through the harness on a fixed batch."""

from __future__ import annotations

import torch

from selfsup import backbones, data, methods, train, views


def load(method: str):
    return methods.load_method_module(method)


def fixed_batch(module, cfg, n: int = 32, seed: int = 0) -> dict:
    """Views of n digits images made by the method's own recipe, as the harness makes them, fixed once."""
    ds = data.load_digits()
    plan = views.plan_views(module.augmentations(cfg, ds.image_size, ds.mean, ds.std), ds.train.in_memory)
    items = [data.ViewDataset(ds.train, plan.host, seed=seed)[i] for i in range(n)]
    batch = data.collate_views(items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch["views"] = plan.make_views(batch["views"])
    return batch


def tiny_model(module, cfg, seed: int = 0):
    torch.manual_seed(seed)
    backbone = backbones.SmallCNN(width=8)
    return module.MODEL(backbone, backbone.feature_dim, cfg)


def smoke_fit(module, cfg, steps: int = 30, lr: float | None = None, seed: int = 0) -> tuple[list[float], torch.nn.Module]:
    """A few dozen harness steps (optimizer, schedule-free lr, hooks) on one fixed batch; returns losses."""
    model = tiny_model(module, cfg, seed)
    if hasattr(model, "setup"):
        model.setup(64, 10)
    uses_labels = bool(getattr(cfg, "uses_labels", False))  # as the harness does: labels only for those that ask
    batch = train.prepare_batch(fixed_batch(module, cfg), torch.device("cpu"), uses_labels, False)
    opt = train.build_optimizer(model, cfg, lr if lr is not None else cfg.base_lr * 32 / 256)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "on_step_end"):
            model.on_step_end(step + 1, steps)
        losses.append(loss.item())
    return losses, model


def backbone_grad_norm(model, loss: torch.Tensor, backbone: torch.nn.Module) -> float:
    model.zero_grad()
    loss.backward()
    return sum(float(p.grad.abs().sum()) for p in backbone.parameters() if p.grad is not None)
