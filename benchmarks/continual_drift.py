"""How far the frozen old route of C-LoRA soft mode moves while the next task trains.

After task 0 and end_task, R_old is frozen, but lora_A / lora_B keep training through the new
route P·R_delta (docs/design.md section 2). The old route's weight s·lora_B·R_oldᵀ·lora_A therefore
changes although no gradient sees it. This prints its relative change over task 1, and the size
of the routing learned on task 1 (‖P·R_delta‖ / ‖R_old‖), per optimizer, mean of 3 seeds.

    python benchmarks/continual_drift.py        (CPU, about 10 s)
"""
import statistics

import torch

import clora_kernels.continual as cc
from clora_kernels.nn import clora_layers


def old_route(model, r_old=None):
    return {n: (l.scaling * l.lora_B @ (l.routing_old if r_old is None else r_old[n]).t() @ l.lora_A).detach().clone()
            for n, l in clora_layers(model)}


def main():
    pre, tasks = cc.digits_splits()
    print(f"{'optimizer':10s} {'lr':>6s} {'old-route change':>17s} {'|P R_delta|/|R_old|':>20s}  task-1 acc")
    for optimizer, lr in (("adam", 5e-3), ("sgd", 0.02)):
        drift, grown, accs = [], [], []
        for seed in range(3):
            model, _ = cc.build_method(cc.pretrain(pre, 15, seed), "clora_soft", 8, 0.9, False)
            torch.manual_seed(seed + 1000)
            kw = dict(epochs=10, lr=lr, optimizer=optimizer, progress=False, setting="task-il", classifier="linear",
                      seed=seed)
            cc.train_sequence(model, tasks[:1], **kw)              # task 0, then end_task
            before = old_route(model)
            r_old = {n: l.routing_old.clone() for n, l in clora_layers(model)}
            acc = cc.train_sequence(model, tasks[1:2], **kw)        # task 1 (folds at its end)
            accs.append(acc[0][0])
            after = old_route(model, r_old)
            for n, l in clora_layers(model):
                drift.append(float((after[n] - before[n]).norm() / before[n].norm()))
                grown.append(float((l.routing_old - r_old[n]).norm() / r_old[n].norm()))
        print(f"{optimizer:10s} {lr:6g} {statistics.fmean(drift):17.3f} {statistics.fmean(grown):20.3f}"
              f"  {statistics.fmean(accs):.3f}")


if __name__ == "__main__":
    main()
