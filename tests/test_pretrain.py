"""`bevt pretrain` end to end on CPU: learning, exact resume, 2-process DDP (gloo), bad input, broken files."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bevt.config import ConfigError
from bevt.data.datasets import BrokenDatasetError
from bevt.recipes import RECIPES
from bevt.train import checkpoint as ckpt
from bevt.train.pretrain import build_config, pretrain

TINY = [
    "data.crop_size=64", "data.scale_range=64,80", "data.tok_size=32", "data.clip_len=4", "data.frame_interval=4",
    "data.video_batch=2", "data.image_batch=2", "data.num_workers=0", "data.synthesize_if_missing=false",
    "tokenizer.vocab_size=32", "tokenizer.train_steps=5", "model.drop_path_rate=0.0",
    "run.progress=false", "run.tensorboard=false", "run.log_every=1", "optim.warmup_epochs=0", "optim.epochs=1",
]


@pytest.fixture(scope="module")
def tokenizer_file(synth_dataset, tmp_path_factory):
    """A VQ tokenizer trained once (5 steps) on the synthetic frames."""
    path = str(tmp_path_factory.mktemp("tok") / "vq.safetensors")
    cfg = build_config("default", TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={path}",
                                          f"run.out_dir={tmp_path_factory.mktemp('tokrun')}", "optim.max_steps=1"])
    pretrain(cfg)
    assert os.path.exists(path)
    return path


def tiny(synth_dataset, tokenizer_file, out_dir, *extra):
    return build_config("default", TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tokenizer_file}",
                                           f"run.out_dir={out_dir}", *extra])


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_loss_goes_down_and_checkpoint_is_written(synth_dataset, tokenizer_file, tmp_path):
    cfg = tiny(synth_dataset, tokenizer_file, tmp_path / "run", "optim.epochs=3", "optim.lr=2e-3")
    s = pretrain(cfg)
    assert s["steps"] == 24 and s["epochs"] == 3  # 16 clips / 2 per step = 8 steps per epoch
    ls = losses(tmp_path / "run")
    first, last = sum(ls[i] for i in (1, 2, 3)) / 3, sum(ls[i] for i in (22, 23, 24)) / 3
    assert last < first - 0.3, (first, last)
    ckpt = s["checkpoint"]
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "trainer.pt"]
    assert len(os.listdir(tmp_path / "run" / "checkpoints")) <= cfg.run.keep_last
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["data"]["crop_size"] == 64


def test_resume_with_changed_settings_says_which(synth_dataset, tokenizer_file, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))
    capsys.readouterr()
    pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2", "optim.lr=0.01"), resume="auto")
    err = capsys.readouterr().err
    assert "settings changed since that checkpoint" in err and "optim.lr: 0.001 there, 0.01 here" in err, err
    assert "optim.max_steps: 1 there, 2 here" in err and "run.out_dir" not in err.split("changed since")[1]


def test_resume_is_exact(synth_dataset, tokenizer_file, tmp_path):
    full = tiny(synth_dataset, tokenizer_file, tmp_path / "full", "optim.epochs=2", "optim.max_steps=12")
    pretrain(full)
    part = tiny(synth_dataset, tokenizer_file, tmp_path / "part", "optim.epochs=2", "optim.max_steps=5")
    pretrain(part)  # stops after 5 steps (mid-epoch) and writes its checkpoint
    resumed = tiny(synth_dataset, tokenizer_file, tmp_path / "part", "optim.epochs=2", "optim.max_steps=12")
    s = pretrain(resumed, resume="auto")
    assert s["steps"] == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [a[i] for i in range(1, 13)] == [b[i] for i in range(1, 13)]
    # resumed once more, the finished run has nothing to do and writes nothing (a scheduler's next part)
    trainer_pt = os.path.join(s["checkpoint"], "trainer.pt")
    stamp = os.stat(trainer_pt).st_mtime_ns
    again = pretrain(resumed, resume="auto")
    assert again["steps"] == 12 and again["checkpoint"] == s["checkpoint"]
    assert os.stat(trainer_pt).st_mtime_ns == stamp


def test_corrupt_checkpoint_is_a_clear_error(synth_dataset, tokenizer_file, tmp_path):
    from bevt.train.checkpoint import read_model_weights

    s = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "run", "optim.max_steps=2"))
    good = s["checkpoint"]
    cut, junk = tmp_path / "cut", tmp_path / "junk"
    shutil.copytree(good, cut)
    with open(cut / "model.safetensors", "r+b") as f:  # a copy that stopped half-way
        f.truncate(500)
    shutil.copytree(good, junk)
    (junk / "trainer.pt").write_text("not a checkpoint")
    again = tiny(synth_dataset, tokenizer_file, tmp_path / "again", "optim.max_steps=3")
    with pytest.raises(ValueError, match="model.safetensors cannot be read .*truncated or corrupt"):
        pretrain(again, resume=str(cut))
    with pytest.raises(ValueError, match="trainer.pt cannot be read .*resume from an earlier one"):
        pretrain(again, resume=str(junk))
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(ValueError, match="notes.pth cannot be read as a weights-only torch checkpoint"):
        read_model_weights(str(tmp_path / "notes.pth"))
    assert sorted(os.listdir(good)) == ["config.json", "model.safetensors", "trainer.pt"]  # the good one is kept


def test_resume_into_another_model_or_world_size_is_a_clear_error(synth_dataset, tokenizer_file, tmp_path, capsys):
    """--resume auto with a changed model: the settings that differ and the tensors that do not fit, exit 2,
    no traceback; a checkpoint of another process count: the two numbers."""
    from bevt.cli import main

    run = tmp_path / "run"
    pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))
    args = ["pretrain", "--resume", "auto"]
    for ov in TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tokenizer_file}", f"run.out_dir={run}",
                      "optim.max_steps=2", "model.name=videoswin_nano_patch244_window1677"]:
        args += ["--set", ov]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit this run's model" in err and "differ in shape" in err, err
    assert ("model.name: 'videoswin_nano_patch244_window877' there, 'videoswin_nano_patch244_window1677' here"
            in err), err
    assert "Traceback" not in err and "model.init_from=" in err

    latest = os.path.join(run, "checkpoints", "step_00000001")
    st = torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)
    st["world_size"] = 2
    torch.save(st, os.path.join(latest, "trainer.pt"))
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1: exact resume needs the same"):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2"), resume="auto")


def test_resume_with_another_tokenizer_is_a_clear_error(synth_dataset, tokenizer_file, tmp_path, capsys):
    """The checkpoint records its tokenizer's sha256: resuming against another file (or, with a default
    tokenizer that is trained when missing, against none) stops before any training instead of going on
    with other target ids."""
    from bevt.config import ConfigError
    from bevt.train.checkpoint import FINGERPRINTS
    from bevt.train.pretrain import file_sha256

    run = tmp_path / "run"
    s = pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))
    with open(os.path.join(s["checkpoint"], "config.json")) as f:
        assert json.load(f)[FINGERPRINTS]["tokenizer_sha256"] == file_sha256(tokenizer_file)

    other = str(tmp_path / "other.safetensors")  # the same codes, one byte of a weight changed
    with open(tokenizer_file, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 1
    with open(other, "wb") as f:
        f.write(data)
    with pytest.raises(ConfigError, match=r"is not the one that run used .*model.init_from="):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2", f"tokenizer.path={other}"),
                 resume="auto")
    gone = str(tmp_path / "gone.safetensors")  # would be trained now: refused before the training
    with pytest.raises(ConfigError, match="the tokenizer that run used is gone"):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2", f"tokenizer.path={gone}"),
                 resume="auto")
    assert not os.path.exists(gone)
    assert pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2"), resume="auto")["steps"] == 2
    # what the message offers: a new run from that run's weights (a run folder: its latest checkpoint)
    new = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "new", "optim.max_steps=1",
                        f"tokenizer.path={other}", f"model.init_from={run}"))
    assert new["steps"] == 1 and new["init_from"].startswith(str(run / "checkpoints")), new
    assert "initialised from" in capsys.readouterr().err  # the summary says where the weights came from


def test_official_lists_with_data_prefixes(synth_dataset, tokenizer_file, tmp_path):
    """Kinetics-style lists, whose paths start from a videos folder (mmaction's data_prefix), not from the list's
    folder: data.video_prefix / data.image_prefix say where they start."""
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, src in (("videos.txt", synth_dataset.train_list), ("images.txt", synth_dataset.images_list)):
        lines = open(src).read().splitlines()  # "train/<class>/x.mp4 3" -> "<class>/x.mp4 3"
        (lists / name).write_text("".join(line.split("/", 1)[1] + "\n" for line in lines))
    lst = (f"data.video_list={lists / 'videos.txt'}", f"data.image_list={lists / 'images.txt'}")
    image_dir = open(synth_dataset.images_list).readline().split("/")[0]
    s = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "run", *lst, "optim.max_steps=2",
                      "data.video_prefix=train", f"data.image_prefix={image_dir}"))
    assert s["steps"] == 2 and not s["skipped_files"], s
    with pytest.raises(BrokenDatasetError):  # without the prefix every path points into the lists' folder
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "run2", *lst, "optim.max_steps=2"))


@pytest.mark.parametrize("data_parallel,port", [("ddp", 29533), ("allreduce", 29534)])
def test_ddp_two_processes_match_one(synth_dataset, tokenizer_file, tmp_path, data_parallel, port):
    """2 gloo processes x 1 clip + 1 image each == 1 process x 2 + 2 (same global batch and masks), with
    DDP and with AllReduceParallel (the gradient all-reduce that run.cuda_graph uses under torchrun).

    With every sample masking the same number of tokens (exact counts, full-length tubes), the mean of the
    per-process CE means equals the global mean, so the runs must agree to float rounding. (With the
    official variable counts each process averages over its own masked tokens, as the official code does.)
    """
    common = TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tokenizer_file}", "optim.max_steps=4",
                     "mask.exact=true", "mask.tube_range=1.0,1.0", "run.device=cpu"]  # gloo, also on a GPU machine
    one = build_config("default", common + [f"run.out_dir={tmp_path / 'one'}"])
    pretrain(one)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "bevt.cli", "pretrain"]
    for ov in common + [f"run.out_dir={tmp_path / 'two'}", "data.video_batch=1", "data.image_batch=1",
                        f"run.data_parallel={data_parallel}"]:
        args += ["--set", ov]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(b) == 4
    for i in range(1, 5):
        assert abs(a[i] - b[i]) < 1e-4 * a[i], (i, a[i], b[i])
    st = torch.load(os.path.join(tmp_path / "two" / "checkpoints" / "step_00000004" / "trainer.pt"), weights_only=True)
    assert st["world_size"] == 2 and len(st["rng"]) == 2


def test_clear_errors(synth_dataset, tokenizer_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown pretraining recipe 'nope'; recipes: bevt_base_in1k_k400, "):
        build_config("nope", [])
    with pytest.raises(ConfigError, match="has no field 'lrr'"):
        build_config("default", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="cannot parse 'fast' as float"):
        build_config("default", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_config("default", ["data.crop_size=100"])
    for seed in ("-1", "1e30", "2147483648"):  # numpy took the first after the dataset work, torch not the second
        with pytest.raises(ConfigError, match=r"run.seed must be an integer in \[0, 2\^31\), got"):
            build_config("default", [f"run.seed={seed}"])
    assert build_config("default", ["run.seed=2147483647"]).run.seed == 2 ** 31 - 1
    with pytest.raises(ConfigError, match=r"optim.betas must each be in \[0, 1\), got \(1.5, 0.9\)"):
        build_config("default", ["optim.betas=1.5,0.9"])
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r1", f"data.root={tmp_path / 'nothing'}"))
    # a folder of the user's data: the missing list's setting is named, with no advice to write a synthetic set
    with pytest.raises(FileNotFoundError) as e:
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r1b", "data.image_list=in1k_train.txt"))
    assert "data.image_list=in1k_train.txt (" in str(e.value) and "does not exist; check the list setting" in \
        str(e.value) and "bevt data synth" not in str(e.value), str(e.value)
    # the image stream cycles, but it needs one batch: fewer images than a batch is a config error, not a
    # StopIteration from inside the loop
    with pytest.raises(ConfigError, match=r"the images dataset is too small: 0 batches .* lower data.image_batch"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r1c", "data.image_batch=1024"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("")
    (empty / "images.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r2", f"data.root={empty}"))
    # a mistyped model.init_from: named before any dataset or tokenizer work (no tokenizer trained first)
    untrained = tmp_path / "untrained.safetensors"
    with pytest.raises(FileNotFoundError, match=r"model.init_from: checkpoint not found: .*no_such_run"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r1e", f"model.init_from={tmp_path / 'no_such_run'}",
                      f"tokenizer.path={untrained}", "tokenizer.train_if_missing=true"))
    assert not untrained.exists()
    # a tokenizer to train whose file could not be saved: refused before the training, not after it
    a_file = tmp_path / "weights"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match=r"saved at .*weights/vq\.safetensors, but .*weights is a file, not a "
                                          r"folder: set tokenizer.path"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r1d", f"tokenizer.path={a_file / 'vq.safetensors'}",
                      "tokenizer.train_if_missing=true"))
    with pytest.raises(ConfigError, match="tokenizer.vocab_size=32"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r3", "tokenizer.vocab_size=64"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r4", "tokenizer.path=/no/such/tok.safetensors",
                      "tokenizer.train_if_missing=false"))
    with pytest.raises(ConfigError, match="encoder.pkl"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r5", "tokenizer.kind=dalle", "tokenizer.path="))
    with pytest.raises(ConfigError, match="run.cuda_graph=true needs a CUDA device"):
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r6", "run.device=cpu", "run.cuda_graph=true"))
    assert not (tmp_path / "r6").exists()  # refused before anything is written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_run_matches_eager_run(synth_dataset, tokenizer_file, tmp_path):
    """The same tiny run (fast kernels, bf16) eager and replayed from CUDA graphs: the same loss curve."""
    common = ("run.device=cuda", "data.decoder=pyav", "optim.epochs=2", "optim.max_steps=8", "optim.lr=2e-3")
    eager = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "eager", *common))
    graphed = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "graph", *common, "run.cuda_graph=true"))
    assert graphed["steps"] == eager["steps"] == 8
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "graph")
    assert a.keys() == b.keys()
    for step in a:  # replay runs the kernels the eager step runs; AdamW amplifies rounding differences
        assert b[step] == pytest.approx(a[step], rel=1e-2, abs=1e-2), (step, a, b)


@pytest.mark.parametrize("text,want", [("norm,bias", ("norm", "bias")), ("[norm, bias]", ("norm", "bias")),
                                       ('["norm", "bias"]', ("norm", "bias")), ("(norm,)", ("norm",)), ("", ())])
def test_tuple_of_strings_override(text, want):
    assert build_config("default", [f"optim.no_decay_keys={text}"]).optim.no_decay_keys == want


def test_tuple_of_numbers_override():
    assert build_config("default", ["optim.betas=0.9,0.95"]).optim.betas == (0.9, 0.95)
    assert build_config("default", ["optim.betas=[0.9, 0.95]"]).optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="optim.betas must have 2 entries"):
        build_config("default", ["optim.betas=0.9"])
    with pytest.raises(ConfigError, match="cannot parse 'a' as float"):
        build_config("default", ["optim.betas=a,0.9"])


def test_own_data_root_is_never_synthesized_into_unless_asked(tmp_path):
    from bevt.train.finetune import build_config as build_finetune_config

    assert build_config("default", []).data.synthesize_if_missing  # the embedded default makes its own data
    for build in (build_config, build_finetune_config):
        assert not build("default", [f"data.root={tmp_path / 'k400'}"]).data.synthesize_if_missing
        assert build("default", [f"data.root={tmp_path}", "data.synthesize_if_missing=true"]).data.synthesize_if_missing
    with pytest.raises(FileNotFoundError, match="synthesize_if_missing=true"):  # a mistyped path is an error
        pretrain(build_config("default", [f"data.root={tmp_path / 'k4OO'}", f"run.out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "k4OO").exists()


def test_wrong_resume_fails_before_any_work(tmp_path):
    cfg = build_config("default", [f"data.root={tmp_path / 'synth'}", "data.synthesize_if_missing=true",
                                   f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="--resume .*not a checkpoint folder"):
        pretrain(cfg, resume=str(tmp_path / "no_such_checkpoint"))
    assert not (tmp_path / "synth").exists() and not (tmp_path / "run").exists()


def _dali_gpu() -> bool:
    from bevt.data import dali

    return torch.cuda.is_available() and dali._dali_version() is not None


@pytest.mark.skipif(not _dali_gpu(), reason="needs a CUDA GPU and NVIDIA DALI")
def test_dali_decoding_with_cuda_graphs(synth_dataset, tokenizer_file, tmp_path):
    """The production combination: DALI decodes on the GPU (its own threads and streams) while the step is
    captured and then replayed from CUDA graphs. The same loss curve as the eager step on DALI's batches."""
    common = ("run.device=cuda", "data.decoder=dali", "optim.epochs=2", "optim.max_steps=8", "optim.lr=2e-3")
    eager = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "eager", *common))
    graphed = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "graph", *common, "run.cuda_graph=true"))
    assert graphed["steps"] == eager["steps"] == 8
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "graph")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-2, abs=1e-2), (step, a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_graph_under_torchrun_matches_one_process(synth_dataset, tokenizer_file, tmp_path):
    """2 NCCL processes, each replaying its step from CUDA graphs with one gradient all-reduce per step
    (run.data_parallel=auto -> allreduce), against 1 graphed process with the same global batch."""
    common = TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tokenizer_file}", "optim.max_steps=4",
                     "mask.exact=true", "mask.tube_range=1.0,1.0", "run.device=cuda", "data.decoder=pyav",
                     "run.cuda_graph=true"]
    pretrain(build_config("default", common + [f"run.out_dir={tmp_path / 'one'}"]))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535",
            "-m", "bevt.cli", "pretrain"]
    for ov in common + [f"run.out_dir={tmp_path / 'two'}", "data.video_batch=1", "data.image_batch=1"]:
        args += ["--set", ov]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(b) == 4
    for i in range(1, 5):  # bf16 kernels on different batch splits; AdamW amplifies rounding differences
        assert b[i] == pytest.approx(a[i], rel=1e-2, abs=1e-2), (i, a, b)


def test_recipes_registry_and_listing(capsys):
    """Both jobs' recipes go through one registry: a fresh, re-validated config per call, the name recorded,
    duplicates and unknown names refused, and the same listing from `--list-recipes` and `bevt info`."""
    from bevt.cli import main
    from bevt.config import PretrainConfig, Recipes
    from bevt.recipes import RECIPES

    book = Recipes("test")

    @book
    def small() -> PretrainConfig:
        """A small one.

        More text that the listing leaves out."""
        cfg = PretrainConfig()
        cfg.optim.lr = -1.0  # edited after construction: get() must re-validate
        return cfg

    assert book.describe() == {"small": "A small one."}
    with pytest.raises(ConfigError, match="optim.lr"):
        book.get("small")
    with pytest.raises(ValueError, match="'small' is defined twice"):
        book(small)
    a, b = RECIPES.get("default"), RECIPES.get("default")
    assert a.recipe == "default" and a is not b and a.model is not b.model
    a.optim.lr = 123.0
    assert RECIPES.get("default").optim.lr != 123.0

    assert main(["pretrain", "--list-recipes"]) == 0
    listed = capsys.readouterr().out
    assert [line.split()[0] for line in listed.splitlines()] == RECIPES.names()
    assert main(["finetune", "--list-recipes"]) == 0
    assert capsys.readouterr().out.split()[0] == "default"
    assert main(["info", "--recipes"]) == 0
    out = capsys.readouterr().out
    assert listed in out and "bevt finetune --recipe NAME" in out and "k400" in out
    assert main(["finetune", "--recipe", "k401"]) == 2
    assert "unknown fine-tuning recipe 'k401'; recipes: default, diving48, k400, ssv2" in capsys.readouterr().err


def test_cli_rejects_bad_override(capsys):
    from bevt.cli import main

    assert main(["pretrain", "--set", "optim.lr"]) == 2
    assert "section.field=value" in capsys.readouterr().err


def test_config_file_round_trips_and_takes_a_subset(capsys, tmp_path):
    """--config FILE: what --print-config prints (or a run folder) gives the same config back; a subset of
    fields goes over the recipe's; --set applies on top; a path set in the file turns its fallback off."""
    from bevt.cli import main

    assert main(["pretrain", "--recipe", "bevt_tiny_k400", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(printed)
    for source in (tmp_path / "run" / "config.json", tmp_path / "run"):
        assert main(["pretrain", "--config", str(source), "--print-config"]) == 0
        assert capsys.readouterr().out == printed
    part = tmp_path / "part.json"
    part.write_text('\ufeff{"optim": {"lr": 0.0005, "betas": [0.8, 0.9]}, "data": {"root": "/my/videos"}}')
    cfg = RECIPES.build("default", ["optim.warmup_epochs=3"], str(part))
    default = RECIPES.get("default")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.warmup_epochs) == (0.0005, (0.8, 0.9), 3)
    assert cfg.optim.weight_decay == default.optim.weight_decay and cfg.model == default.model
    assert cfg.data.root == "/my/videos" and not cfg.data.synthesize_if_missing
    cfg = RECIPES.build("default", ["optim.lr=1e-3"], str(part))
    assert cfg.optim.lr == 1e-3  # --set wins over the file


@pytest.mark.parametrize("text,msg", [
    ('{"optm": {"lr": 1}}', r"the config has no field 'optm'; did you mean optim\?"),
    ('{"optim": {"lrr": 1}}', r"optim has no field 'lrr'; did you mean optim.lr\?"),
    ('{"optim": 3}', "optim is a section, so it must be a JSON object; got 3"),
    ('{"optim": {"lr": "fast"}}', "optim.lr must be a number, got 'fast'"),
    ('{"optim": {"lr": -1}}', "optim.lr must be finite and > 0"),
    ('{"optim": {"lr": 1,}}', r"not valid JSON \(line 1, column 20"),
    ("[1, 2]", "must hold a JSON object of sections, as --print-config prints; it holds a list"),
])
def test_config_file_errors_name_the_file_and_the_field(capsys, tmp_path, text, msg):
    from bevt.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err) and f"--config {bad}" in err, err
    assert not (tmp_path / "runs").exists()


def test_config_file_that_cannot_be_read(capsys, tmp_path):
    from bevt.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for source, msg in ((tmp_path / "missing.json", "no such file"), ("", "no such file"),
                        (tmp_path / "empty", "is a folder without a config.json"),
                        (tmp_path / "binary.json", "cannot read it")):
        assert main(["finetune", "--config", str(source)]) == 2
        assert msg in capsys.readouterr().err


def test_a_closed_output_pipe_ends_quietly():
    """``bevt pretrain --print-config | head -1``: the reader goes away; no traceback, the shell's SIGPIPE code."""
    proc = subprocess.Popen([sys.executable, "-m", "bevt.cli", "pretrain", "--print-config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything (its imports take far longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_corrupt_video_is_skipped_and_reported(synth_dataset, tokenizer_file, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_dataset.root, root)
    first = (root / "train.txt").read_text().split()[0]
    with open(root / first, "r+b") as f:  # keep the header, destroy the rest
        f.seek(2000)
        f.write(os.urandom(4000))
        f.truncate(6000)
    s = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "run", f"data.root={root}", "optim.epochs=1"))
    assert s["steps"] == 8
    assert any(p.endswith(first) for p in s["skipped_files"]), s["skipped_files"]


def test_tokenizer_train_cli(synth_dataset, tmp_path):
    from bevt.cli import main
    from bevt.tokenizers import load_tokenizer

    out = tmp_path / "tok.safetensors"
    args = ["tokenizer", "train", "--out", str(out), "--steps", "3", "--frames", "32", "--vocab-size", "16"]
    for ov in TINY + [f"data.root={synth_dataset.root}"]:
        args += ["--set", ov]
    assert main(args) == 0
    assert load_tokenizer(str(out)).vocab_size == 16
    assert main(args) == 2  # refuses to overwrite
    assert main(args[:3] + ["bad.pt"] + args[4:]) == 2


# ---------------------------------------------------------------------------------- stopping on a signal
def test_a_signal_stops_the_run_after_its_step_and_resume_is_exact(synth_dataset, tokenizer_file, tmp_path,
                                                                   monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) during step 4: the step finishes, its metrics are logged although
    it is no log step, a checkpoint of step 4 is written, the handlers are given back, and --resume auto
    ends with the same weights as a run that was never stopped."""
    from bevt.train import pretrain as job
    from bevt.train.checkpoint import read_model_weights

    extra = ("optim.max_steps=6", "run.log_every=5")
    full = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "full", *extra))
    step = job.PretrainStep.__call__

    def signalled(self, batches, ctx):
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the step's work
        return step(self, batches, ctx)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(job.PretrainStep, "__call__", signalled)
    capsys.readouterr()
    s = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "part", *extra))
    err = capsys.readouterr().err
    assert (s["stopped_by"], s["steps"]) == ("SIGTERM", 4)
    assert s["checkpoint"].endswith("step_00000004")
    assert "SIGTERM received; stopping after this step" in err
    assert "bevt pretrain: stopped by SIGTERM at step 4 of 6" in err and "--resume auto" in err
    assert sorted(losses(tmp_path / "part")) == [4]  # log_every=5: the stop wrote its own row
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.undo()
    r = pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "part", *extra), resume="auto")
    assert r["steps"] == 6 and r["stopped_by"] is None
    a, b = read_model_weights(full["checkpoint"]), read_model_weights(r["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_signal_stops_at_once_in_one_process_and_is_ignored_under_torchrun(capsys):
    from bevt.train.distributed import DistInfo
    from bevt.train.loop import StopRequests

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with StopRequests(DistInfo()) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT  # asked, not interrupted
            os.kill(os.getpid(), signal.SIGINT)  # again: the previous handler (KeyboardInterrupt) runs
            for _ in range(100):  # the handler runs between bytecodes; give it some
                pass
    assert signal.getsignal(signal.SIGINT) == before
    with StopRequests(DistInfo(rank=1, world_size=2)) as stop:
        for _ in range(2):  # the launcher forwards what its process group already got: one request
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert "rank 1: stopping at the next log step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) == before


def test_run_job_exit_code_of_a_stopped_run():
    from types import SimpleNamespace

    from bevt.train.job import run_job

    args = SimpleNamespace(recipe="default", config=None, overrides=[], print_config=False, resume=None,
                           list_recipes=False)
    for stopped_by, code in (("SIGINT", 130), ("SIGTERM", 143), ("a signal to another process", 143)):
        assert run_job("bevt pretrain", RECIPES, lambda cfg, resume: {"stopped_by": stopped_by}, args) == code
    assert run_job("bevt pretrain", RECIPES, lambda cfg, resume: {"stopped_by": None}, args) == 0


def _start_and_signal(args: list[str], run_dir, sig: signal.Signals, *, one_worker: bool = False,
                      timeout: float = 300):
    """Start a job in its own process group, wait for its first metrics row, then send ``sig`` to the whole
    group (as Ctrl-C in a terminal or a scheduler does), or to one training process of a torchrun job only.
    Returns the finished process and its stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or hung before its first step: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    if one_worker:  # torchrun's children that run bevt (Linux /proc)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        workers = []
        for pid in children:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"bevt.cli" in f.read():
                    workers.append(pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], sig)
    else:
        os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, err


def _cli_args(synth_dataset, tokenizer_file, run_dir, *extra, launcher=()):
    args = [sys.executable, *launcher, "-m", "bevt.cli", "pretrain"]
    for ov in TINY + [f"data.root={synth_dataset.root}", f"tokenizer.path={tokenizer_file}", f"run.out_dir={run_dir}",
                      "run.device=cpu", "optim.epochs=50", *extra]:
        args += ["--set", ov]
    return args


def _checkpoint_state(run, step: int) -> dict:
    return torch.load(os.path.join(run, "checkpoints", f"step_{step:08d}", "trainer.pt"), weights_only=True)


def test_ctrl_c_writes_a_checkpoint_and_resume_goes_on(synth_dataset, tokenizer_file, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the job and its loader workers): exit code 130 after the checkpoint of
    the step it stopped at, and --resume auto goes on from that step."""
    run = tmp_path / "run"
    proc, err = _start_and_signal(_cli_args(synth_dataset, tokenizer_file, run, "data.num_workers=1"), run,
                                  signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT at step" in err, err[-3000:]
    stopped_at = max(losses(run))
    assert _checkpoint_state(run, stopped_at)["step"] == stopped_at
    r = subprocess.run(_cli_args(synth_dataset, tokenizer_file, run, f"optim.max_steps={stopped_at + 2}") +
                       ["--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(run, 'checkpoints', f'step_{stopped_at:08d}')}" in r.stderr
    assert max(losses(run)) == stopped_at + 2


_TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node=2")


def test_sigterm_to_a_torchrun_job_stops_every_process_at_one_log_step(synth_dataset, tokenizer_file, tmp_path):
    """A scheduler's SIGTERM reaches every process of a torchrun job, the loader workers included, and each
    training process gets it again from the launcher. They go on to the next log step, agree there, write one
    checkpoint and exit. With 8 steps per epoch and run.log_every=16, the signal comes after the first row
    (step 8, an epoch's end) and the run stops at step 16: 8 more steps of batches from loader workers that
    must still be serving."""
    run = tmp_path / "run"
    args = _cli_args(synth_dataset, tokenizer_file, run, "data.video_batch=1", "data.image_batch=1",
                     "data.num_workers=1", "run.log_every=16", "optim.epochs=12",
                     launcher=_TORCHRUN + ("--master_port=29536",))
    proc, err = _start_and_signal(args, run, signal.SIGTERM)
    assert proc.returncode != 0  # torchrun reports that it was signalled
    assert "stopped by SIGTERM at step" in err and "exited unexpectedly" not in err, err[-3000:]
    stopped_at = max(losses(run))
    assert stopped_at == 16
    st = _checkpoint_state(run, stopped_at)
    assert st["step"] == stopped_at and st["world_size"] == 2 and len(st["rng"]) == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"))])
def test_sigterm_to_one_torchrun_process_stops_both(synth_dataset, tokenizer_file, tmp_path, device):
    """Only one process gets the signal: the other learns it through the metrics' all-reduce at the next
    log step, and both stop there with one checkpoint (else one would wait forever in a collective). On
    GPUs: NCCL, with each step replayed from CUDA graphs."""
    run = tmp_path / "run"
    gpu = ("run.device=cuda", "run.cuda_graph=true", "data.decoder=pyav") if device == "cuda" else ()
    port = {"cpu": 29537, "cuda": 29538}[device]
    args = _cli_args(synth_dataset, tokenizer_file, run, "data.video_batch=1", "data.image_batch=1",
                     "run.log_every=3", *gpu, launcher=_TORCHRUN + (f"--master_port={port}",))
    proc, err = _start_and_signal(args, run, signal.SIGTERM, one_worker=True)
    assert proc.returncode != 0
    assert "SIGTERM received; rank" in err and "bevt pretrain: stopped by" in err, err[-3000:]
    stopped_at = max(losses(run))
    assert stopped_at > 3 and (stopped_at % 3 == 0 or stopped_at % 8 == 0)  # a log step after the first
    st = _checkpoint_state(run, stopped_at)
    assert st["step"] == stopped_at and st["world_size"] == 2


def test_a_dataset_of_unreadable_videos_is_one_clear_error(synth_dataset, tokenizer_file, tmp_path, capfd):
    """Every clip unreadable (decoded in a loader worker): the command's one-line error and exit 2, no
    traceback; bevt's warnings (one per skipped file) print as `bevt: ...` lines."""
    import warnings

    from bevt.cli import main
    from bevt.data.datasets import SkippedFileWarning

    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    lines = []
    for i in range(8):
        (root / "videos" / f"v{i}.mp4").write_bytes(b"\x00not a video" * 200)
        lines.append(f"videos/v{i}.mp4 0")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    args = ["pretrain"]
    for ov in TINY + [f"data.root={root}", "data.video_list=train.txt", f"data.image_list={synth_dataset.images_list}",
                      f"tokenizer.path={tokenizer_file}", f"run.out_dir={tmp_path / 'run'}", "data.num_workers=1",
                      "optim.max_steps=2"]:
        args += ["--set", ov]
    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "bevt pretrain: " in err and "files in a row could not be read" in err and "Traceback" not in err, err
    # (pytest records the worker's warnings instead of printing them: the format is checked directly)
    w = SkippedFileWarning("skipping unreadable file a.mp4: empty file (0 bytes)")
    assert warnings.formatwarning(w, SkippedFileWarning, "fetch.py", 54) == f"bevt: {w}\n"
    assert warnings.formatwarning("x", UserWarning, "f.py", 1).startswith("f.py:1: UserWarning: x")


def test_a_fresh_run_does_not_write_into_an_earlier_runs_checkpoints(synth_dataset, tokenizer_file, tmp_path):
    """A second run without --resume in the same folder stops before any work, naming --resume auto; the
    first run's checkpoint stays. Pruning never removes the checkpoint just written."""
    run = tmp_path / "run"
    first = pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=2"))["checkpoint"]
    with pytest.raises(ConfigError, match="--resume auto"):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1", "optim.lr=1e-4"))
    assert os.listdir(run / "checkpoints") == [os.path.basename(first)]
    with pytest.raises(ConfigError, match="is a file"):
        pretrain(tiny(synth_dataset, tokenizer_file, run / "config.json"))
    model = torch.nn.Linear(2, 2)
    for step in (5, 1):  # a step below the folder's latest
        kept = ckpt.save_checkpoint(str(tmp_path / "k"), step, model=model, trainer_state={}, config={}, keep_last=1)
    assert os.path.basename(kept) in os.listdir(tmp_path / "k" / "checkpoints")


def test_one_job_at_a_time_per_run_folder(synth_dataset, tokenizer_file, tmp_path):
    """A run folder another live job holds (its lock: host and pid) is refused before any work; a lock whose
    process is gone is stale and taken over; the lock is released when the run ends, also when it fails."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lock = run / ckpt.RunFolderLock.NAME
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # this test's own process: alive
    with pytest.raises(ConfigError, match=r"is in use by another job .*delete .*\.lock"):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))
    lock.write_text(f"another-host.example {os.getpid()}")  # cannot be checked: refused too
    with pytest.raises(ConfigError, match="in use by another job"):
        pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{socket.gethostname()} {gone.pid}")  # a crashed job's lock
    assert pretrain(tiny(synth_dataset, tokenizer_file, run, "optim.max_steps=1"))["steps"] == 1
    assert not lock.exists()
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):  # fails after taking the lock
        pretrain(tiny(synth_dataset, tokenizer_file, tmp_path / "r2", "tokenizer.vocab_size=64"))
    assert not (tmp_path / "r2" / ckpt.RunFolderLock.NAME).exists()


def test_learning_rates_must_be_finite_and_the_floor_below_the_peak():
    for bad in ("optim.min_lr=-1", "optim.min_lr=1", "optim.lr=1e999"):
        with pytest.raises(ConfigError, match="optim"):
            build_config("default", [bad])
    assert build_config("default", ["optim.min_lr=1e-6"]).optim.min_lr == 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA mask kernel can run on this machine")
def test_a_kernel_backend_that_cannot_run_here_stops_the_run_before_any_work(tmp_path):
    """Checked in the preflight: the missing dataset is never reached, and the message names the setting."""
    cfg = build_config("default", [f"data.root={tmp_path / 'none'}", f"run.out_dir={tmp_path / 'run'}",
                                   "kernels.masking=cuda"])
    with pytest.raises(ConfigError, match="kernels.masking=cuda .*cannot run here"):
        pretrain(cfg)
