"""Block reconstruction: minimise ‖f(x) − f̂(x)‖² over one unit's rounding variables and
activation step sizes with Adam (the paper's §4.1; AdaRound's schedule for AdaRound).

x is the unit's input in the quantized model calibrated so far, f(x) the float unit's
output. On a GPU the whole training step is captured once as a CUDA graph and replayed:
the small blocks of our models are otherwise bound by Python and kernel launches.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib.rounding import adaround_beta, adaround_regularizer

GRAPH_WARMUP = 3  # eager steps before a CUDA graph is captured (they count as training steps)


def adaround_schedule(step: int, iters: int) -> tuple[float, float]:
    """(β, regulariser weight) at a step: weight 0 in the 20% warm-up, then 0.01 with β
    annealed from 20 to 2 (Nagel et al. 2020 and their reference code)."""
    beta = adaround_beta(step, iters)
    return (20.0, 0.0) if beta is None else (beta, 0.01)


def _optimizer(qlayers: list, lr: float, act_lr: float, on_gpu: bool, use_graph: bool):
    round_params = [p for q in qlayers for p in q.rounding_params()]
    act_params = [q.act.scale for q in qlayers
                  if q.act is not None and q.act.enabled and q.act.scale.requires_grad]
    groups = [{"params": round_params, "lr": lr}] if round_params else []
    if act_params:
        groups.append({"params": act_params, "lr": act_lr})
    if not groups:
        return None
    # fused Adam on a GPU: one kernel for all parameters; capturable so a graph can replay it
    if on_gpu:
        return torch.optim.Adam(groups, fused=True, capturable=use_graph)
    return torch.optim.Adam(groups)


def _make_step(unit: nn.Module, qlayers: list, x: torch.Tensor, y: torch.Tensor, opt,
               adaround: bool) -> Callable:
    """One training step on the mini-batch ``idx``; returns the reconstruction loss (on the
    device, no sync). ``beta`` and ``reg_weight`` may be floats or device tensors."""
    def step(idx, beta, reg_weight):
        out = unit(x[idx])
        # ‖·‖² summed over channels, averaged over batch and positions (as BRECQ's lp_loss)
        rec = (out - y[idx]).pow(2).sum(1).mean()
        loss = rec
        if adaround and reg_weight is not None:  # None: AdaRound's warm-up, eager path
            loss = rec + reg_weight * sum(adaround_regularizer(q.V, beta) for q in qlayers)
        loss.backward()
        opt.step()
        return rec.detach()
    return step


def _run_eager(step, opt, batches, losses, schedule, bar) -> None:
    for k in bar:
        beta, reg_weight = schedule(k)
        opt.zero_grad(set_to_none=True)
        losses[k] = step(batches[k], beta, reg_weight or None)


def _run_graph(step, opt, batches, losses, schedule, bar, dev: torch.device) -> None:
    """The first GRAPH_WARMUP steps eagerly on a side stream (graphs need a warm-up), then
    the step captured once and replayed with β, the regulariser weight and the mini-batch
    indices copied into the graph's static inputs."""
    beta_t = torch.tensor(20.0, device=dev)
    reg_t = torch.tensor(0.0, device=dev)
    static_idx = batches[0].clone()

    def load(k):
        beta, reg_weight = schedule(k)
        beta_t.fill_(beta)
        reg_t.fill_(reg_weight)

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    it = iter(bar)
    with torch.cuda.stream(side):
        for k in range(GRAPH_WARMUP):
            next(it)
            load(k)
            opt.zero_grad(set_to_none=True)
            losses[k] = step(batches[k], beta_t, reg_t)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_rec = step(static_idx, beta_t, reg_t)
    for k in it:
        load(k)
        static_idx.copy_(batches[k])
        graph.replay()
        losses[k] = static_rec


def reconstruct(unit: nn.Module, qlayers: list, x: torch.Tensor, y: torch.Tensor, *,
                iters: int, batch_size: int, lr: float, rounding: str,
                generator: torch.Generator, act_lr: float | None = None, desc: str = "",
                progress: bool = True, cuda_graph: bool = True) -> list[float]:
    """Train ``qlayers`` (the quantized layers inside ``unit``) so that unit(x) matches y;
    returns the reconstruction loss of every step. Rounding variables learn at ``lr``,
    activation steps at ``act_lr`` (None: lr/10; as BRECQ, steps learn slower). Every
    mini-batch is drawn up front from ``generator`` and moved once, and the losses stay on
    the device: the loop never waits for the GPU."""
    use_graph = cuda_graph and x.is_cuda and iters > GRAPH_WARMUP
    opt = _optimizer(qlayers, lr, lr / 10 if act_lr is None else act_lr, x.is_cuda, use_graph)
    if opt is None or iters == 0:
        return []
    adaround = rounding == "adaround"
    for q in qlayers:
        q.soft = adaround  # AdaRound trains through the soft h(V)
    batches = torch.randint(0, len(x), (iters, batch_size), generator=generator).to(x.device)
    losses = torch.empty(iters, device=x.device)
    step = _make_step(unit, qlayers, x, y, opt, adaround)
    schedule = (lambda k: adaround_schedule(k, iters)) if adaround else (lambda k: (20.0, 0.0))
    bar = tqdm(range(iters), desc=desc, leave=False, disable=not progress, mininterval=1.0)
    if use_graph:
        _run_graph(step, opt, batches, losses, schedule, bar, x.device)
    else:
        _run_eager(step, opt, batches, losses, schedule, bar)
    for q in qlayers:
        q.soft = False
    return losses.tolist()
