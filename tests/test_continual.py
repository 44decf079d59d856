"""The continual-learning workflow: metrics on hand-made matrices, bad input, the CLI's JSON, and
the claim (C-LoRA forgets less than sequential LoRA without a lower Last-Acc) on a reduced run."""
import json
import math

import pytest

import clora_kernels as ck
from clora_kernels import continual as cc

# a[i][j]: accuracy on task j after training task i
A = [[0.9],
     [0.6, 0.8],
     [0.5, 0.7, 1.0]]


def test_metrics_on_hand_made_matrix():
    assert math.isclose(cc.last_accuracy(A), (0.5 + 0.7 + 1.0) / 3)
    assert math.isclose(cc.incremental_accuracy(A), (0.9 + 0.7 + (0.5 + 0.7 + 1.0) / 3) / 3)
    # task 0: best before the end 0.9, final 0.5 -> 0.4; task 1: best 0.8, final 0.7 -> 0.1
    assert math.isclose(cc.average_forgetting(A), (0.4 + 0.1) / 2)
    assert cc.average_forgetting([[0.7]]) == 0.0
    rising = [[0.5], [0.6, 0.9], [0.8, 0.9, 0.9]]   # improvement counts as negative forgetting (backward transfer)
    assert math.isclose(cc.average_forgetting(rising), ((0.6 - 0.8) + 0.0) / 2)


def test_metrics_refuse_malformed_matrix():
    with pytest.raises(ValueError, match="empty"):
        cc.last_accuracy([])
    with pytest.raises(ValueError, match="row 1"):
        cc.average_forgetting([[0.9], [0.5]])


def _tasks():
    _, tasks = cc.digits_splits()
    return tasks


def test_bad_input_before_training():
    tasks = _tasks()
    model = ck.inject_clora(cc.MLP(), target_modules=("fc1", "fc2"), rank=4)
    empty = cc.Task((4, 5), tasks[2].train_x[:0], tasks[2].train_y[:0], tasks[2].test_x, tasks[2].test_y)
    with pytest.raises(ValueError, match="task 1 is empty"):
        cc.train_sequence(model, [tasks[0], empty], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"task 1 has classes \[0, 1\] that an earlier task already had"):
        cc.train_sequence(model, [tasks[0], tasks[0]], epochs=1, progress=False)
    small = ck.inject_clora(cc.MLP(classes=6), target_modules=("fc1", "fc2"), rank=4)
    with pytest.raises(ValueError, match="class 7 but the head has only 6 outputs"):
        cc.train_sequence(small, tasks, epochs=1, progress=False)
    with pytest.raises(ValueError, match="no CLoRALinear layers"):
        cc.train_sequence(cc.MLP(), tasks, clora=True, epochs=1, progress=False)
    with pytest.raises(ValueError, match="setting must be"):
        cc.train_sequence(model, tasks, setting="domain-il", epochs=1, progress=False)
    assert all(p.grad is None for p in model.parameters())          # nothing was trained


def test_digits_splits_are_disjoint_and_balanced():
    (px, py), tasks = cc.digits_splits()
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert set(py.tolist()) == set(range(10))
    total = px.shape[0] + sum(t.train_x.shape[0] + t.test_x.shape[0] for t in tasks)
    assert total == 1797
    for t in tasks:
        assert set(t.train_y.tolist()) == set(t.classes) == set(t.test_y.tolist())


def test_cli_quick_json_and_interrupted_run_keeps_results(tmp_path, monkeypatch):
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    assert cc.main(["--quick", "--seeds", "0", "--epochs", "1", "--methods", "clora_soft", "seq_lora",
                    "--json", str(js), "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(js.read_text())
    assert set(data["methods"]) == {"clora_soft", "seq_lora"} and data["meta"]["setting"] == "class-il"
    for m in data["methods"].values():
        for key in ("last_acc", "inc_acc", "forgetting"):
            assert set(m[key]) == {"mean", "std"} and 0.0 <= m[key]["mean"] <= 1.0
        assert [len(r) for r in m["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert png.read_bytes()[:4] == b"\x89PNG"

    calls = {"n": 0}
    real = cc.train_sequence

    def dies_on_second_method(*a, **k):   # an interruption after the first method finished
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(cc, "train_sequence", dies_on_second_method)
    with pytest.raises(KeyboardInterrupt):
        cc.main(["--seeds", "0", "--epochs", "1", "--methods", "full_ft", "seq_lora", "--json", str(js),
                 "--no-progress"])
    kept = json.loads(js.read_text())
    assert set(kept["methods"]) == {"full_ft"}      # complete file, first method's results intact


def _reduced(setting):
    args = cc.build_parser().parse_args(["--quick", "--setting", setting, "--freeze-factors",
                                         "--methods", "clora_soft", "seq_lora"])
    res = cc.run_experiment(args, progress=False)
    return res["clora_soft"], res["seq_lora"]


def test_clora_forgets_less_and_keeps_last_acc_task_il():
    """The claim on the reduced run (4 epochs per task, seeds 0 and 1), task-incremental, C-LoRA
    soft mode with the shared factors frozen after the first task: the frozen route cannot
    drift, so forgetting is exactly 0, and Last-Acc is not lower. Measured with the default run
    too (README "Continual learning"). With DESIGN.md's default semantics (factors keep learning
    through the new route) the claim does not hold on this sequence; the README says why."""
    c, s = _reduced("task-il")
    assert c["forgetting"]["mean"] < s["forgetting"]["mean"], (c["forgetting"], s["forgetting"])
    assert c["last_acc"]["mean"] >= s["last_acc"]["mean"], (c["last_acc"], s["last_acc"])


def test_clora_forgets_less_class_il():
    """Class-incremental, same configuration: forgetting is much lower (0.08 vs 0.30 reduced,
    0.14 vs 0.34 default run). Last-Acc is not asserted: it is higher in the reduced run and
    lower within one std in the default run (README: the shared head's recency bias dominates)."""
    c, s = _reduced("class-il")
    assert c["forgetting"]["mean"] < s["forgetting"]["mean"], (c["forgetting"], s["forgetting"])


def test_diverging_training_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"training diverged on task 0 .*lower the learning rate, now 1e\+06 with sgd"):
        cc.main(["--seeds", "0", "--epochs", "1", "--methods", "seq_lora", "--optimizer", "sgd", "--lr", "1e6",
                 "--no-progress"])
    with pytest.raises(SystemExit, match="--lr must be positive"):
        cc.main(["--lr", "0", "--no-progress"])
