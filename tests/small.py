"""The very small run configuration shared by the trainer-level tests (seconds on a CPU).

SMALL_RUN pins `run.device=cpu`: the tests' tolerances are fp32 CPU numerics, and with the default
`auto` a CUDA machine would run them in bf16. A GPU test overrides it after (`run.device=cuda`).
"""

SMALL_MODEL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=128",
]
SMALL_RUN = [
    *SMALL_MODEL,
    "data.task_train_size=64",
    "data.task_eval_size=6",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "train.steps=2",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=4",
    "sft.steps=3",
    "sft.batch_size=8",
    "eval.n=2",
    "run.tensorboard=false",
    "run.progress=false",
    "run.device=cpu",
]
