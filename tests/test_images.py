"""The image protocols of clora-continual (clora_kernels/images.py), offline on a generated
ImageFolder with an untrained timm ViT: the JSON schema, the accuracy matrix, a killed run resumed
to the uninterrupted run's numbers, and every refusal (exit code 2, one line, nothing written)."""
import json

import pytest
import torch

from clora_kernels import continual as cc
from clora_kernels import images as im

timm = pytest.importorskip("timm")
PIL = pytest.importorskip("PIL.Image")

ARGS = ["--dataset", "folder", "--tasks", "3", "--model", "vit_tiny_patch16_224", "--no-pretrained",
        "--image-size", "32", "--epochs", "1", "--seeds", "0", "--workers", "0", "--batch-size", "8",
        "--no-progress"]


def _folder(root, classes=6, per_class=6, empty=None):
    """An ImageFolder tree: one colour per class (plus noise), so the classes can be learnt."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        if c == empty:
            continue
        colour = torch.rand(3, generator=g) * 255
        for i in range(per_class):
            img = (colour[None, None] + 40 * torch.randn(20, 20, 3, generator=g)).clamp(0, 255).to(torch.uint8)
            PIL.fromarray(img.numpy()).save(d / f"{i}.png")
    return root


def test_folder_protocol_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "data")
    methods = ["clora_freeze", "clora_project", "seq_lora"]
    argv = ARGS + ["--data-dir", str(data), "--methods", *methods]
    assert cc.main(argv + ["--out", str(tmp_path / "whole"), "--json", str(tmp_path / "whole.json")]) == 0
    out = capsys.readouterr().out
    assert "clora_freeze seed 0 task 2 " in out                        # a line per task with its row
    whole = json.loads((tmp_path / "whole.json").read_text())
    meta = whole["meta"]
    assert meta["dataset"] == "folder" and meta["model"] == "vit_tiny_patch16_224" and meta["pretrained"] is False
    assert meta["image_size"] == 32 and meta["tasks"] == 3 and len(meta["class_order"]) == 3
    assert meta["data_dir"] == str(data)         # (absolute; results.json named no data folder)
    assert sorted(c for t in meta["class_order"] for c in t) == list(range(6))
    for m in methods:
        entry = whole["methods"][m]
        assert [len(r) for r in entry["acc_matrix"]] == [1, 2, 3]
        assert 0.0 <= entry["last_acc"]["mean"] <= 1.0 and set(entry["forgetting"]) == {"mean", "std"}
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["methods"].keys() == set(methods)
    progress = json.loads((tmp_path / "whole" / "clora_freeze" / "seed0" / "progress.json").read_text())
    assert progress["task"] == 2 and progress["acc"] == whole["methods"]["clora_freeze"]["acc_matrices"][0]

    # killed after the second task of the second method: the resumed run ends where the whole one did
    real = im._Checkpoint.save

    def dies(self, model, i, acc, prototypes, gen, seconds=0.0):
        real(self, model, i, acc, prototypes, gen, seconds)
        if "clora_project" in self.folder and i == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(im._Checkpoint, "save", dies)
    assert cc.main(argv + ["--out", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(im._Checkpoint, "save", real)
    capsys.readouterr()
    assert cc.main(argv + ["--out", str(tmp_path / "part"), "--resume"]) == 0
    assert "clora_project seed 0: resumed after task 1" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    for m in methods:
        assert resumed["methods"][m]["acc_matrices"] == whole["methods"][m]["acc_matrices"], m
        a, b = (torch.load(tmp_path / run / m / "seed0" / "state.pt", weights_only=False) for run in ("whole", "part"))
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"]), m      # bit-exact, not just
        assert torch.equal(a["prototypes"]["sums"], b["prototypes"]["sums"]), m             # the accuracies
        from safetensors.torch import load_file
        fa, fb = (load_file(tmp_path / run / m / "seed0" / s["adapter"]) for run, s in (("whole", a), ("part", b)))
        assert all(torch.equal(fa[k], fb[k]) for k in fa), m


def _refused(argv, capsys, word):
    with pytest.raises(SystemExit) as info:
        cc.main(argv)
    assert info.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[0].startswith("usage: "), err     # argparse's usage, then
    assert sum(line.startswith("clora-continual: error: ") for line in err) == 1        # one error line
    assert err[-1].startswith("clora-continual: error: ") and word in err[-1], err[-1]


def test_refusals_before_any_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _folder(tmp_path / "data")
    gap = _folder(tmp_path / "gap", empty=4)
    _folder(tmp_path / "split" / "train")
    _folder(tmp_path / "split" / "test", classes=5)
    _folder(tmp_path / "valid" / "train")
    _folder(tmp_path / "valid" / "valid")
    hidden = _folder(tmp_path / "hidden")
    (hidden / ".ipynb_checkpoints").mkdir()
    PIL.new("RGB", (20, 20)).save(hidden / ".ipynb_checkpoints" / "0.png")
    wide = _folder(tmp_path / "wide")
    for png in wide.glob("*/*.png"):
        PIL.open(png).convert("L").convert("I;16").save(png)
    cases = [
        (["--data-dir", str(tmp_path / "nowhere")], "is not a folder"),
        (["--data-dir", str(gap)], "class4"),
        (["--data-dir", str(tmp_path / "split")], "different classes (['class5'] in train/ alone)"),
        (["--data-dir", str(data), "--tasks", "4"], "--tasks 4: the 6 classes"),
        (["--data-dir", str(data), "--tasks", "7"], "--tasks 7: the 6 classes"),
        (["--data-dir", str(hidden), "--tasks", "4"], "--tasks 4: the 6 classes"),    # (.ipynb_checkpoints/ was one)
        (["--data-dir", str(data), "--model", "vit_nonexistent_model"], "not a timm model"),
        (["--data-dir", str(data), "--pretrained"], "cannot be fetched"),
        (["--data-dir", str(data), "--resume", "--out", str(tmp_path / "fresh")], "holds no run to resume"),
        (["--data-dir", str(data), "--targets", "nope"], "no nn.Linear of the model matches"),
        (["--data-dir", str(data), "--targets", "qkv", "fc_1"], "--targets ['fc_1']: match no layer"),
        (["--data-dir", str(data), "--rank", "1000"], "--rank 1000: the targeted layers need rank <= 192"),
        (["--data-dir", str(data), "--image-size", "7"], "--image-size 7: vit_tiny_patch16_224 cuts images into "
                                                          "patches 16x16 apart"),
        # (at 40 the model saw the top-left 32x32 pixels alone, silently; a helper's attack)
        (["--data-dir", str(data), "--image-size", "40"], "the last 8 rows or columns would be dropped"),
        # (train/ beside valid/ ran as two classes named so)
        (["--data-dir", str(tmp_path / "valid")], "has folders ['train', 'valid'], a tree split in advance"),
        # (PIL's RGB conversion clipped 16-bit pixels to white: a run at chance, exit 0)
        (["--data-dir", str(wide)], "pixels are of mode I;16"),
        (["--data-dir", str(data), "--backend", "cuda"], "cuda cannot run here"),
        (["--data-dir", str(data), "--pretrain-epochs", "3"], "only for --dataset digits"),
        (["--data-dir", str(data), "--pretrain-seed", "1"], "--pretrain-seed: only for --dataset mnist5k"),
    ]
    for extra, word in cases:
        _refused(ARGS + extra, capsys, word)
    assert not (tmp_path / "fresh" / "run.json").exists()
    _refused(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--no-progress"], capsys,
             "holds no CIFAR-100 (cifar-100-python/); pass --download")
    _refused(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--data-seed", "1", "--no-progress"], capsys,
             "--data-seed 1: CIFAR-100 comes with its own train/test split")
    _refused(["--dataset", "folder", "--no-progress"], capsys, "needs --data-dir")
    _refused(["--dataset", "mnist5k", "--model", "resnet18", "--no-progress"], capsys, "uses its own backbone")
    _refused(["--pretrain-seed", "0", "--no-progress"], capsys, "--pretrain-seed: only for --dataset mnist5k")
    _refused(["--data-dir", str(data), "--no-progress"], capsys, "argument --data-dir: only for --dataset cifar100 / "
             "imagenet-r / folder")


def test_a_folder_dataset_pickles_and_a_class_named_train_is_a_class(tmp_path):
    """The dataset pickles, as a DataLoader worker started by spawn (macOS, Windows, Python 3.14) needs (a
    class made inside a function did not), and a class folder named train beside others is a class
    (CIFAR-100 has one), where train/ beside valid/ is a split."""
    import pickle
    import subprocess
    import sys
    data = _folder(tmp_path / "data", classes=3)
    (data / "class0").rename(data / "train")
    ds = im._image_folder(str(data), "--data-dir")
    im._image_folder(str(data), "--data-dir")      # (a second one, as train/ and test/ make: the first still pickles)
    assert ds.classes == ["class1", "class2", "train"]
    (tmp_path / "ds.pkl").write_bytes(pickle.dumps(ds))
    code = f"import pickle; ds = pickle.loads(open({str(tmp_path / 'ds.pkl')!r}, 'rb').read()); print(len(ds), ds[0][1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == [str(len(ds)), "0"], out.stderr


def test_resume_names_a_damaged_run_and_outputs_on_the_runs_files_are_refused(tmp_path, capsys):
    """A truncated run.json or checkpoint was a JSONDecodeError / PytorchStreamReader traceback, a truncated
    results.json one after the backbone and data had loaded; --json on run.json overwrote it (every later
    --resume refused), on a method folder failed mid-run; a method given twice trained twice and was
    reported once (a helper's attack)."""
    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ARGS + ["--data-dir", str(data), "--methods", "seq_lora", "--out", str(out)]
    for extra in (["--json", str(out / "run.json")], ["--json", str(out)], ["--json", str(out / "seq_lora")],
                  ["--plot", str(out / "seq_lora" / "seed0" / "m.png")]):
        _refused(argv + extra, capsys, f"is a file the run in --out {str(out)!r} writes itself")
    _refused(ARGS + ["--data-dir", str(data), "--methods", "seq_lora", "simple_cil", "seq_lora"], capsys,
             "--methods: ['seq_lora'] given more than once")
    assert cc.main(argv + ["--json", str(out / "mine.json")]) == 0           # (beside the run's files: fine)
    (out / "results.json").write_text("{")
    assert cc.main(argv + ["--resume"]) == 0      # (its rows come from the checkpoints again)
    assert "results.json cannot be read" in capsys.readouterr().err
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"seq_lora"}
    state = out / "seq_lora" / "seed0" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert cc.main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert "the checkpoint of seq_lora seed 0 in" in err and "remove that folder" in err and "Traceback" not in err
    (out / "run.json").write_text("{")
    _refused(argv + ["--resume"], capsys, "run.json cannot be read")


def test_resume_refuses_other_settings(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    argv = ARGS + ["--data-dir", str(data), "--methods", "simple_cil", "--out", str(tmp_path / "run")]
    assert cc.main(argv) == 0
    _refused(argv, capsys, "holds a run already; pass --resume")
    _refused([a if a != "32" else "48" for a in argv] + ["--resume"], capsys, "other settings (image_size")
    assert cc.main(argv + ["--resume"]) == 0                   # complete: nothing left to train
    # --head-lr spelt out as the --lr it defaults to is the same setting (it was refused); another is not
    lr = str(cc._DEFAULTS["images"]["lr"])
    assert cc.main(argv + ["--resume", "--head-lr", lr]) == 0
    _refused(argv + ["--resume", "--head-lr", "0.5"], capsys, "other settings (head_lr")
    # a resume that runs another method keeps the run's results of the earlier ones in results.json
    other = [a if a != "simple_cil" else "seq_lora" for a in argv] + ["--resume", "--json", str(tmp_path / "o.json")]
    assert cc.main(other) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["methods"]) == {"simple_cil", "seq_lora"}
    # which command each kept method came from (meta named this command alone, which ran no simple_cil)
    assert set(results["meta"]["earlier"]) == {"simple_cil"}
    assert "--methods simple_cil" in results["meta"]["earlier"]["simple_cil"]["command"]
    assert "--methods seq_lora" in results["meta"]["command"]
    assert set(json.loads((tmp_path / "o.json").read_text())["methods"]) == {"seq_lora"}     # (this command's)
    capsys.readouterr()
    # on other seeds the earlier entries would stand under this run's meta.seeds: they are not kept
    seeds1 = list(other)
    seeds1[seeds1.index("--seeds") + 1] = "1"
    assert cc.main(seeds1) == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["methods"]) == {"seq_lora"} and saved["meta"]["seeds"] == [1]
    assert "held seeds [0]" in capsys.readouterr().err
    # a resume on another backbone (a rebuilt pre-training cache, other weights) is refused; a run from
    # before the fingerprint is resumed with a word that it cannot be checked
    run_json = tmp_path / "run" / "run.json"
    record = json.loads(run_json.read_text())
    assert len(record["backbone"]) == 16
    run_json.write_text(json.dumps({**record, "backbone": "0" * 16}))
    _refused(argv + ["--resume"], capsys, "the backbone's weights differ")
    run_json.write_text(json.dumps({k: v for k, v in record.items() if k != "backbone"}))
    assert cc.main(argv + ["--resume"]) == 0
    assert "predates backbone fingerprints" in capsys.readouterr().out
    assert json.loads(run_json.read_text())["backbone"] == record["backbone"]
    # ... and on changed data: an image replaced by one of another size, one added (the same path and
    # settings: the run mixed two datasets); a run from before the data fingerprint is resumed with a word
    assert len(record["data"]) == 16
    image = data / "class0" / "0.png"
    original = image.read_bytes()
    image.write_bytes(original + b"\0")
    _refused(argv + ["--resume"], capsys, "the data differ from those the run")
    image.write_bytes(original)
    (data / "class1" / "new.png").write_bytes(original)
    _refused(argv + ["--resume"], capsys, "the data differ from those the run")
    (data / "class1" / "new.png").unlink()
    run_json.write_text(json.dumps({k: v for k, v in record.items() if k != "data"}))
    assert cc.main(argv + ["--resume"]) == 0
    assert "predates data fingerprints" in capsys.readouterr().out
    assert json.loads(run_json.read_text())["data"] == record["data"]
    # its run.json gone, the checkpoints stay: a new run there was refused by nothing and continued them
    run_json.unlink()
    _refused(argv, capsys, "holds checkpoints of an earlier run")


def test_default_target_names_a_model_lacks_are_not_refused(capsys):
    """The refusal of a --targets name that matches nothing is for names the command line gave: the
    wiki-topics default (query key value dense) on an encoder without `query` (MPNet, DeBERTa) was
    refused as if the user had written it (a review of the change)."""
    import argparse
    from collections import OrderedDict
    from torch.utils.data import TensorDataset
    model = torch.nn.Sequential(OrderedDict(dense=torch.nn.Linear(4, 4), head=torch.nn.Linear(4, 2)))
    data = TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    task = cc.DataTask((0, 1), data, data, data.tensors[1], data.tensors[1])
    args = argparse.Namespace(targets=["query", "dense"], rank=2, dataset="wiki-topics", targets_given=False)
    im._check_model(model, "head", task, args)
    assert "the default targets' names ['query'] match no layer of this model; the 1 layers the others match are " \
        "adapted (e.g. ['dense']" in capsys.readouterr().err          # (said, as inject_clora says it of timm's)
    args.targets_given = True
    with pytest.raises(im.DataError, match=r"--targets \['query'\]: match no layer"):
        im._check_model(model, "head", task, args)


def test_an_unreadable_image_is_named_in_one_line(tmp_path, capsys):
    """A file under --data-dir that is no image: one line that names it, whether the DataLoader read it
    in this process or in a worker (torch re-raises a worker's error wrapped in its traceback), found by
    the check's first batch (exit 2, before any training) or mid-run (exit 1; no hint to --resume, which
    the changed data would refuse)."""
    root = tmp_path / "data"
    _folder(root / "train")
    _folder(root / "test")
    bad = root / "train" / "class3" / "2.png"
    bad.write_bytes(b"not a png")
    for workers in ("0", "2"):
        argv = list(ARGS)
        argv[argv.index("--workers") + 1] = workers
        out = tmp_path / f"run{workers}"
        assert cc.main(argv + ["--data-dir", str(root), "--methods", "simple_cil", "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert err[0].startswith("clora-continual: error: --data-dir: ") and f"{bad}' cannot be read as an image" \
            in err[0] and "--resume" not in err[0], err
    for test_image in (root / "test").glob("*/*.png"):     # the check's first batch
        test_image.write_bytes(b"not a png")
    _refused(argv + ["--data-dir", str(root)], capsys, "cannot be read as an image (UnidentifiedImageError")


def test_interrupt_before_the_run_exists_gives_no_resume_hint(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the data or the backbone loads: no run.json yet, so no hint to --resume (which
    would be refused)."""
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(im, "prepare", interrupted)
    data = _folder(tmp_path / "data")
    assert cc.main(ARGS + ["--data-dir", str(data), "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err and "Traceback" not in err


def test_checkpoint_keeps_the_gpu_generator(tmp_path, monkeypatch):
    """On a GPU, dropout draws from the GPU's generator: a checkpoint saves its state and a resume
    restores it (simulated: no GPU here), so a resumed run continues the uninterrupted one's draws."""
    cuda = torch.cuda
    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "set_rng_state_all", restored.append)
    ckpt = im._Checkpoint(str(tmp_path / "seed0"))
    model, gen = torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.Generator().manual_seed(0)
    ckpt.save(model, 0, [[1.0]], None, gen)
    state = ckpt.load()
    assert [t.tolist() for t in state["cuda_rng"]] == [[1, 2, 3]]
    ckpt.restore(model, state, None, gen)
    assert [[t.tolist() for t in r] for r in restored] == [[[1, 2, 3]]]


def test_split_and_tasks_are_fixed():
    labels = torch.arange(50) % 5
    tr, te = im.split_per_class(labels)
    assert len(te) == 10 and set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 50
    assert torch.equal(im.split_per_class(labels)[1], te)          # the same split every time
    assert im.class_order(5, None) == [0, 1, 2, 3, 4] and sorted(im.class_order(5, 3)) == [0, 1, 2, 3, 4]


def test_mnist5k_protocol_and_its_cached_backbone(tmp_path, monkeypatch, capsys):
    """The shipped real-data protocol on a reduced run: the Animal-MNIST ViT is pre-trained once
    (one epoch here), cached with its provenance, and reused by the next run."""
    monkeypatch.setenv("CLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(im, "ANIMAL_PRETRAIN", dict(im.ANIMAL_PRETRAIN, epochs=1))
    argv = ["--dataset", "mnist5k", "--quick", "--methods", "clora_freeze", "--no-progress",
            "--json", str(tmp_path / "m.json")]
    assert cc.main(argv) == 0
    assert "pre-trained the ViT on Animal-MNIST" in capsys.readouterr().out
    data = json.loads((tmp_path / "m.json").read_text())
    meta = data["meta"]
    assert meta["dataset"] == "mnist5k" and meta["image_size"] == 28 and meta["class_order"][0] == [0, 1]
    assert meta["pretraining"]["config"]["epochs"] == 1 and 0.0 < meta["pretraining"]["held_out_acc"] <= 1.0
    assert [len(r) for r in data["methods"]["clora_freeze"]["acc_matrix"]] == [1, 2, 3, 4, 5]
    cached = list((tmp_path / "cache" / "pretrained").glob("*.safetensors"))
    assert len(cached) == 1 and json.loads(cached[0].with_name(cached[0].name + ".json").read_text())["torch"]
    # defaults filled (tasks) and a complete run: --resume accepts it, keeps its numbers and its time
    assert cc.main(argv + ["--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert cc.main(argv + ["--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "pre-trained" not in capsys.readouterr().out                    # the cached backbone
    assert json.loads((tmp_path / "m.json").read_text())["methods"]["clora_freeze"]["seconds"]["mean"] > 0.1
    again = json.loads((tmp_path / "m.json").read_text())["methods"]["clora_freeze"]
    assert again["acc_matrices"] == data["methods"]["clora_freeze"]["acc_matrices"]      # the same numbers
    # another pre-training seed: another backbone, cached beside the first; its run does not resume the first's
    other = ["--dataset", "mnist5k", "--quick", "--methods", "simple_cil", "--no-progress", "--pretrain-seed", "3"]
    assert cc.main(other + ["--json", str(tmp_path / "s3.json")]) == 0
    assert "pre-trained the ViT on Animal-MNIST" in capsys.readouterr().out
    assert json.loads((tmp_path / "s3.json").read_text())["meta"]["pretraining"]["config"]["seed"] == 3
    assert meta["pretraining"]["config"]["seed"] == 0
    assert len(list((tmp_path / "cache" / "pretrained").glob("*.safetensors"))) == 2
    _refused(argv + ["--out", str(tmp_path / "run"), "--resume", "--pretrain-seed", "3"], capsys,
             "made with other settings (pretrain_seed")


def test_default_targets_leave_out_narrow_layers(tmp_path, capsys):
    """Without --targets the image protocol adapts inject_clora's default targets as inject_clora does:
    SwinV2-CR's 2 -> 384 relative-position MLP (named fc1) is left out, not a refusal of the rank (the
    CLI's equal list of names refused every rank above 2); the run's saved settings still resume."""
    data = _folder(tmp_path / "data")
    argv = ["--dataset", "folder", "--tasks", "3", "--model", "swinv2_cr_tiny_ns_224", "--no-pretrained",
            "--image-size", "64", "--epochs", "1", "--seeds", "0", "--workers", "0", "--batch-size", "8",
            "--no-progress", "--data-dir", str(data), "--methods", "clora_freeze", "--rank", "4"]
    with pytest.warns(UserWarning, match=r"the default targets leave out \d+ layer\(s\) narrower .*meta_mlp\.fc1"):
        assert cc.main(argv + ["--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["result_key"]["targets"] == \
        ["qkv", "proj", "fc1", "fc2"]
    capsys.readouterr()
    with pytest.warns(UserWarning, match="the default targets leave out"):
        assert cc.main(argv + ["--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_interrupted_joint_is_said_to_start_again(tmp_path, monkeypatch, capsys):
    """joint trains once on every task and keeps no checkpoint: the hint to --resume said it would
    continue from the last finished task (a helper's attack)."""
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cc, "run_joint", interrupted)
    data = _folder(tmp_path / "data")
    argv = ARGS + ["--data-dir", str(data), "--out", str(tmp_path / "run"), "--methods", "simple_cil", "joint"]
    assert cc.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(simple_cil)" in err and "--resume" in err and "(joint, one training on every task, starts again)" in err


def test_patch_misfit_reads_the_first_unpadded_convolution():
    """The grid check read a patch embedding's `proj` or its patch size: PiT's patches of 16 overlap, 8 apart
    (its embedding holds `conv`), and sizes that fit (232) were refused; ConvNeXt has no patch embedding and
    its 4x4 stem dropped the last rows silently at 230. ResNet's padded stem drops none."""
    import timm
    from clora_kernels.images import patch_misfit

    def misfit(name, size):
        kwargs = {} if name.startswith(("resnet", "convnext")) else {"img_size": size}
        return patch_misfit(timm.create_model(name, pretrained=False, **kwargs), size)
    assert misfit("pit_ti_224", 232) == "" and "16x16, 8 apart, and the last 6 rows" in misfit("pit_ti_224", 230)
    assert "4x4 apart, and the last 2 rows" in misfit("convnext_atto", 230) and misfit("convnext_atto", 224) == ""
    assert misfit("resnet18", 225) == "" and "the last 8 rows" in misfit("vit_tiny_patch16_224", 40)
