"""A run directory holds data, never code, and damage in it is caught before it is trained on.

Planted pickles (a payload whose unpickling calls os.system) in the meta file, in the shards' index
and in a value inside a shard are refused in one line naming the file, and the payload never runs;
a file changed but not resized (garbage, one flipped byte) is found by its checksum and the run
resumes from the checkpoint before. Through the CLI in a subprocess, as tests/test_resume.py does;
meta.json's exact round trip and `load` without `resume_point` in this process."""

import copy
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from test_resume import _comparable, assert_one_line_error, run_cli, small_args, small_cfg
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from resrl import checkpoint
from resrl.checkpoint_format import CHECKSUM, file_checksums, json_checksum
from resrl.config import RunError
from resrl.tracker import read_metrics
from resrl.trainer import Trainer


class Payload:
    """Unpickling this runs `touch marker` (what a planted file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished two-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("base")
    Trainer(small_cfg(out, "run.checkpoint_every=1")).fit()
    return out / "run"


@pytest.fixture
def run_copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path


def rehash(ckpt):
    """Rewrite meta.json to match the files as they are now, as whoever plants a file could: the
    checksums find damage; the refusals must not depend on them."""
    content = json.loads((ckpt / "meta.json").read_text())
    sums = file_checksums(ckpt, list(content["files"]))
    for rel, entry in content["files"].items():
        entry.update({"bytes": (ckpt / rel).stat().st_size, CHECKSUM: sums[rel]})
    content[CHECKSUM] = json_checksum({key: content[key] for key in ("format", "files", "meta")})
    (ckpt / "meta.json").write_text(json.dumps(content))


def assert_redone_like_the_base(run_copy, base_run):
    """Step 2 redone from step 1's checkpoint is the step the base run took."""
    redone, straight = read_metrics(run_copy / "run")[1], read_metrics(base_run)[1]
    assert _comparable(redone) == pytest.approx(_comparable(straight), rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------- planted code


@pytest.mark.parametrize(
    "content", ["payload-instead-of-meta.json", "payload-beside-meta.json", "old-format"]
)
def test_pickled_meta_file_is_refused_unopened(run_copy, content):
    ckpt = run_copy / "run" / "checkpoints" / "step_000002"
    marker = run_copy / "pwned"
    planted = Payload(marker) if content.startswith("payload") else {"step": 2, "config": {}}
    torch.save(planted, ckpt / "meta.pt")
    if content != "payload-beside-meta.json":
        (ckpt / "meta.json").unlink(missing_ok=True)
    proc = run_cli(run_copy, "", ["train", *small_args(run_copy)])
    assert_one_line_error(
        proc,
        f"{ckpt / 'meta.pt'}: a pickled meta file (resrl's checkpoint format before meta.json)",
        "did not open it",
        "run.resume=false",
    )
    assert not marker.exists()
    # Refused, not set aside: the run directory is as it was.
    assert (ckpt / "meta.pt").is_file()


@pytest.mark.parametrize("meta_json", ["as-saved", "rewritten-to-match"])
def test_planted_index_is_refused_in_one_line(run_copy, meta_json):
    ckpt = run_copy / "run" / "checkpoints" / "step_000002"
    index = ckpt / "shards" / ".metadata"
    marker = run_copy / "pwned"
    payload = pickle.dumps(Payload(marker))
    # The size it had, so that a check of sizes alone lets it through.
    index.write_bytes(payload + b"\0" * (index.stat().st_size - len(payload)))
    if meta_json == "rewritten-to-match":
        rehash(ckpt)
    proc = run_cli(run_copy, "", ["train", *small_args(run_copy)])
    assert_one_line_error(
        proc,
        f"{index} names posix.system, which a torch.distributed.checkpoint index never holds: refused, "
        "nothing in it was run",
    )
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_planted_value_in_a_shard_is_refused_in_one_line(run_copy, tmp_path):
    """DCP stores the optimizer's hyperparameters as pickles inside the shard files."""
    ckpt = run_copy / "run" / "checkpoints" / "step_000002"
    shards = ckpt / "shards"
    marker = run_copy / "pwned"
    dcp_to_torch_save(shards, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(shards)
    torch.distributed.checkpoint.save(state, checkpoint_id=shards, no_dist=True)
    rehash(ckpt)
    proc = run_cli(run_copy, "", ["train", *small_args(run_copy)])
    assert_one_line_error(
        proc,
        f"{shards / '__0_0.distcp'}: the saved value of optim.param_groups.0.lr names posix.system besides "
        "plain data: refused, nothing in it was run",
    )
    assert not marker.exists()


# ---------------------------------------------------------------------------- damage


def flip_middle_byte(data):
    data[len(data) // 2] ^= 0xFF
    return data


DAMAGE = {
    "shard-garbage": ("shards/__0_0.distcp", lambda data: bytearray(random.Random(0).randbytes(len(data)))),
    # Inside the tensor data: loads without an error unless the checksum is compared.
    "shard-one-byte": ("shards/__0_0.distcp", flip_middle_byte),
    # Still a valid index, naming a weight that does not exist.
    "index-renamed-key": ("shards/.metadata", lambda data: data.replace(b"embed_tokens", b"embed_tokenz")),
    "meta.json-step": ("meta.json", lambda data: data.replace(b'"step": 2', b'"step": 3')),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_of_the_same_size_resumes_from_the_previous(run_copy, base_run, case):
    rel, damage = DAMAGE[case]
    ckpts = run_copy / "run" / "checkpoints"
    path = ckpts / "step_000002" / rel
    data = bytearray(path.read_bytes())
    damaged = damage(bytearray(data))
    assert len(damaged) == len(data) and damaged != data
    path.write_bytes(damaged)
    proc = run_cli(run_copy, "", ["train", *small_args(run_copy)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        f"resrl: warning: checkpoint {ckpts / 'step_000002'} is damaged ({rel} does not match its checksum"
        in proc.stderr
    )
    assert f"resuming from step 1 ({ckpts / 'step_000001'})" in proc.stderr
    assert (ckpts / "damaged_step_000002").is_dir()
    assert_redone_like_the_base(run_copy, base_run)


TWO_RANKS = """
import sys
from pathlib import Path
from test_resume import small_cfg
from resrl import checkpoint
from resrl.config import RunError
from resrl.distributed import init_world, shutdown
world = init_world("cpu")
out = Path(sys.argv[1])
try:
    found, _ = checkpoint.resume_point(out / "run", small_cfg(out, "train.steps=3"), world)
    result = str(found)
except RunError as e:
    result = f"{type(e).__name__}: {e}"
(out / f"rank{world.rank}.txt").write_text(result)
shutdown(world)
"""


@pytest.mark.parametrize("case", ["damaged", "planted"])
def test_two_processes_agree_on_the_resume_point(run_copy, case):
    """Rank 0 verifies and moves damaged checkpoints aside; every rank resumes from (or refuses)
    the same one."""
    ckpts = run_copy / "run" / "checkpoints"
    marker = run_copy / "pwned"
    if case == "damaged":
        shard = ckpts / "step_000002" / "shards" / "__0_0.distcp"
        shard.write_bytes(flip_middle_byte(bytearray(shard.read_bytes())))
        expected = f"{ckpts / 'step_000001'}"
    else:
        (ckpts / "step_000002" / "shards" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        expected = f"CheckpointRefused: {ckpts / 'step_000002' / 'shards' / '.metadata'} names posix.system"
    script = run_copy / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": f"{os.path.dirname(tests)}:{tests}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(run_copy)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=run_copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert (run_copy / f"rank{rank}.txt").read_text().startswith(expected), rank
    assert proc.stderr.count("is damaged (") == (case == "damaged")
    assert not marker.exists()


# ---------------------------------------------------------------------------- meta.json, load


def assert_same(a, b, where="meta"):
    """Equal values of the same types all the way down (tensors: dtype, shape and bits)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), where
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def tiny_checkpoint(tmp_path, meta):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = checkpoint.save(tmp_path, 1, module=module, optimizer=optimizer, meta=meta)
    return path, module, optimizer


def test_meta_round_trips_exactly(tmp_path):
    random.seed(7)
    torch.manual_seed(7)
    meta = {
        "step": 1,
        "rng": checkpoint.rng_state(),
        "nested": (1, (2.5, None), [True, "x", -0.0]),
        "keys": {1: "a", (2, 3): float("inf"), "b": float("nan")},
        "looks_tagged": {"__tuple__": [1, 2]},
        "tensors": [torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), torch.tensor(7), torch.empty(0, 4)],
        "big": 2**70,
        "history": {"eval": {"pass@1": 0.25, "rows": [[1, 2.0]]}},
    }
    # What both generators draw next from the saved state.
    expected = (random.random(), torch.rand(3))
    path, _, _ = tiny_checkpoint(tmp_path, meta)
    loaded = checkpoint.load_meta(path)
    assert_same(loaded, meta)
    # Python's generator state is the tuple it was: restored, both draw the same again.
    checkpoint.set_rng_state(loaded["rng"])
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_meta_that_json_cannot_hold_fails_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint meta meta.history.when: a object cannot be stored"):
        tiny_checkpoint(tmp_path, {"step": 1, "history": {"when": object()}})
    assert not list((tmp_path / "checkpoints").glob("*step_*"))


def test_load_restores_model_and_optimizer_exactly(tmp_path):
    path, module, optimizer = tiny_checkpoint(tmp_path, {"step": 1})
    saved_model = {k: v.clone() for k, v in module.state_dict().items()}
    saved_optim = copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    checkpoint.load(path, module=module, optimizer=optimizer)
    assert_same(dict(module.state_dict()), saved_model, "model")
    assert_same(optimizer.state_dict(), saved_optim, "optimizer")


def test_load_without_resume_point_verifies_and_refuses(tmp_path):
    """`load` on a checkpoint it was handed (a --resume path): verified, read as data only."""
    path, module, optimizer = tiny_checkpoint(tmp_path, {"step": 1})
    assert checkpoint.load(path, module=module, optimizer=optimizer) == {"step": 1}
    shard = path / "shards" / "__0_0.distcp"
    shard.write_bytes(flip_middle_byte(bytearray(shard.read_bytes())))
    with pytest.raises(RunError, match=r"is damaged \(shards/__0_0.distcp does not match its checksum"):
        checkpoint.load(path, module=module, optimizer=optimizer)
    index = path / "shards" / ".metadata"
    index.write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    with pytest.raises(checkpoint.CheckpointRefused, match=r"\.metadata names posix.system"):
        checkpoint.load(path, module=module, optimizer=optimizer)
    assert not (tmp_path / "pwned").exists()
