"""The colocated engine around the update, in the order a GPU needs (stand-ins record the calls).

After the update: the allocator's cached blocks go back to the device, the engine's weights wake
and take the new values, then its KV cache wakes and the prefix cache is emptied. On the CPU the
engine has no sleep mode, so a stand-in LLM object takes the CUDA branch's place; the vLLM version
range the engine accepts is checked in one line.
"""

import pytest
import torch
from small import SMALL_RUN

from resrl import trainer as trainer_module
from resrl.config import resolve
from resrl.errors import MissingPackageError
from resrl.rollout.vllm_engine import VLLMEngine, check_vllm_version
from resrl.trainer import Trainer


def _cfg(out):
    return resolve(
        "tiny",
        overrides=[*SMALL_RUN, "run.device=cpu", "eval.before=false", "run.name=run", f"run.out_dir={out}"],
    )


def test_trainer_frees_cache_wakes_weights_syncs_then_wakes_kv_cache(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path))
    calls = []
    engine = trainer.engine

    class Recorder:
        def __getattr__(self, name):
            method = getattr(engine, name)

            def record(*args, **kwargs):
                calls.append(name if not args else f"{name}{list(args[0]) if name == 'wake_up' else ''}")
                return method(*args, **kwargs)

            return record

    monkeypatch.setattr(
        trainer_module, "free_cached_memory", lambda device: calls.append("free_cached_memory")
    )
    trainer.engine = Recorder()
    trainer.train_step(0)
    trainer.train_step(1)
    step = [
        "generate",
        "sleep",
        "free_cached_memory",
        "wake_up['weights']",
        "sync_weights",
        "wake_up['kv_cache']",
    ]
    assert calls == step * 2


class StandInLLM:
    """What VLLMEngine calls on `vllm.LLM`, recorded."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep(level={level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")

    def collective_rpc(self, fn, args=()):
        # The weights stream: consumed as the worker would.
        self.calls.append(f"collective_rpc({len(list(args[0]))} tensors)")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def _engine(on_cpu: bool) -> VLLMEngine:
    """A VLLMEngine around a stand-in LLM, as the constructor leaves it on CUDA (sleep mode) or CPU."""
    engine = object.__new__(VLLMEngine)
    engine.llm = StandInLLM()
    engine.on_cpu = on_cpu
    engine._sleep_mode = not on_cpu
    engine._asleep = set()
    engine.dtype = torch.bfloat16
    # Merged weights (rollout.lora_serving=merged, or no LoRA).
    engine.lora_rank = 0
    engine._lora_request = None
    return engine


def test_vllm_engine_on_cuda_wakes_weights_then_kv_cache_and_resets_the_prefix_cache_last():
    engine = _engine(on_cpu=False)
    model = torch.nn.Linear(4, 4)
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    engine.wake_up(("weights",))
    engine.sync_weights(model)
    engine.wake_up(("kv_cache",))
    engine.wake_up()  # awake: nothing more
    assert engine.llm.calls == [
        "sleep(level=1)",
        "wake_up(['weights'])",
        "collective_rpc(2 tensors)",
        "wake_up(['kv_cache'])",
        "reset_prefix_cache",
    ]
    # Awake, a sync (warm start, resume) resets the prefix cache itself.
    engine.sync_weights(model)
    assert engine.llm.calls[-2:] == ["collective_rpc(2 tensors)", "reset_prefix_cache"]


def test_vllm_engine_refuses_a_sync_into_sleeping_weights_and_unknown_tags():
    engine = _engine(on_cpu=False)
    engine.sleep()
    with pytest.raises(RuntimeError, match="sync_weights while its weights sleep"):
        engine.sync_weights(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="accepted: weights, kv_cache"):
        engine.wake_up(("everything",))


def test_vllm_engine_on_cpu_has_no_sleep_mode():
    engine = _engine(on_cpu=True)
    engine.sleep()
    engine.wake_up(("weights",))
    engine.sync_weights(torch.nn.Linear(4, 4))
    engine.wake_up(("kv_cache",))
    assert engine.llm.calls == ["collective_rpc(2 tensors)", "reset_prefix_cache"]


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0+cpu", "0.34.0", "0.30.1rc1"])
def test_vllm_versions_with_the_apis_used_are_accepted(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.10.2", "0.25.1", "0.35.0", "1.0.0", "unknown"])
def test_vllm_versions_without_them_are_one_line(version):
    with pytest.raises(MissingPackageError, match=rf"vllm {version} is installed; .*vllm>=0\.26,<0\.35"):
        check_vllm_version(version)
