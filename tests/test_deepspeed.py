"""DeepSpeed ZeRO-2 / ZeRO-3 for real (issue 15): two CPU processes, gloo, ``DiffpoTrainer`` with the sampler head.

One 2-process run (spawning and importing DeepSpeed cost more than the training) trains three cases in turn:

- ``zero2_lora``: ZeRO-2 with a LoRA adapter (the recipes' choice for LLaDA-8B / Dream-7B);
- ``zero3_gather_full``: ZeRO-3, full fine-tuning, ``ds3_gather_for_generation=True`` (the default): rollouts run on
  weights gathered once by ``unwrap_model_for_generation``. The sampler head's behaviour snapshot used to gather
  the head a second time inside that context (deepspeed 0.19.8: "Nested GatheredParameters contexts cannot overlap
  parameters"; 0.19.3 re-partitioned the head mid-rollout);
- ``zero3_synced_lora``: ZeRO-3 with LoRA and ``ds3_gather_for_generation=False``: every forward is a collective.
  The two ranks' heads map the same output to very different entropy bounds (rank 0 commits one token per step,
  rank 1 a whole block), so rank 1 finishes its rollouts long before rank 0 and must keep stepping.

Each case uses the per-rank recipe of docs/scaling.md ("ZeRO on CPU"): ``ACCELERATE_USE_DEEPSPEED=true``,
``PartialState(backend="gloo")``, ``accelerator_config={"use_configured_state": True}``, ``bf16=False``, a
``deepspeed`` dict without an ``optimizer`` block and, for ZeRO-3, ``stage3_param_persistence_threshold: 0`` (else
a tiny model's parameters stay gathered and no forward is a collective). The workers skip building DeepSpeed's
shared-memory C++ op (used only by DeepSpeed-inference's all-reduce, not by ZeRO training) to save a 30-110 s
compile; the CLI test at the end runs the user-facing route unchanged, op included (cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed", reason="install the dev extras: pip install -e '.[dev]' (pins deepspeed)")

from test_distributed import TRAIN_PROMPTS, WORLD_SIZE, _digit_fraction_reward, _free_port, _spawn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPAWN_TIMEOUT_S = 420  # 3 DeepSpeed engines per rank on a shared 2-core machine; a hang is what this guards against

TRAIN_STEPS = 2
GEN_LENGTH = 16
BLOCK_LENGTH = 8
# zero3_synced_lora: the head starts mid-range on both ranks (identical weights); the range sets the entropy bound
SLOW_RANK_THRESHOLD_MAX = 1e-3  # rank 0: below any two-token entropy sum -> one token per step, NFE up to 16
FAST_RANK_THRESHOLD_MAX = 1e3  # rank 1: above a whole block's entropy -> a block per step, NFE = 2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    stage: int
    gather_for_generation: bool = True
    lora: bool = False
    rank_dependent_steps: bool = False


CASES = (
    Case("zero2_lora", stage=2, lora=True),
    Case("zero3_gather_full", stage=3),
    Case("zero3_synced_lora", stage=3, gather_for_generation=False, lora=True, rank_dependent_steps=True),
)


def _deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    auto = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping")
    return {"zero_optimization": zero, **dict.fromkeys(auto, "auto")}


def _gathered(named_parameters) -> dict[str, torch.Tensor]:
    """Full copies of (possibly ZeRO-3 partitioned) parameters; a collective under ZeRO-3: call on every rank."""
    import deepspeed

    named = list(named_parameters)
    with deepspeed.zero.GatheredParameters([parameter for _, parameter in named]):  # a no-op for plain tensors
        return {name: parameter.detach().clone() for name, parameter in named}


def _build_model(tokenizer):
    from trl_diffpo.tiny import build_tiny_model

    return build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=0)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _train_case(rank: int, out_dir: str, case: Case) -> dict:
    from accelerate.state import AcceleratorState
    from datasets import Dataset

    import trl_diffpo.trainer_rollouts as trainer_module  # where the rollouts call diffusion_generate
    from trl_diffpo import DiffpoConfig, DiffpoTrainer, SamplerHeadCallback
    from trl_diffpo.tiny import build_char_tokenizer

    AcceleratorState._reset_state(reset_partial_state=False)  # each case brings its own DeepSpeed plugin
    tokenizer = build_char_tokenizer()
    model = _build_model(tokenizer)
    forward_calls = []
    model.register_forward_hook(lambda module, args, output: forward_calls.append(1))
    rollouts = []  # per rollout on this rank: local NFE per row, model forwards issued
    original_generate = trainer_module.diffusion_generate

    def recording_generate(*args, **kwargs):
        before = len(forward_calls)
        output = original_generate(*args, **kwargs)
        rollouts.append({"nfe": output.nfe.clone(), "forwards": len(forward_calls) - before})
        return output

    trainer_module.diffusion_generate = recording_generate
    threshold_max = 2.0
    if case.rank_dependent_steps:
        threshold_max = SLOW_RANK_THRESHOLD_MAX if rank == 0 else FAST_RANK_THRESHOLD_MAX
    output_dir = os.path.join(out_dir, case.name)
    args = DiffpoConfig(
        output_dir=output_dir,
        deepspeed=_deepspeed_config(case.stage),
        accelerator_config={"use_configured_state": True},
        ds3_gather_for_generation=case.gather_for_generation,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        sampler="entropy_bounded",
        threshold=threshold_max / 2,
        temperature=0.9,
        num_iterations=1,  # a fresh rollout every step: the second one follows a head update
        beta=0.0,
        max_steps=TRAIN_STEPS,
        learning_rate=1e-2,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    callback = SamplerHeadCallback(
        mode="joint", nfe_penalty=0.5, mlp_hidden_size=8, threshold_max=threshold_max, init_threshold=threshold_max / 2
    )
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=_digit_fraction_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
        processing_class=tokenizer,
        peft_config=_lora_config() if case.lora else None,
        callbacks=[callback],
    )
    try:
        module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        before = _gathered(module.named_parameters())
        trainer.train()
        after = _gathered(module.named_parameters())
        trainer.save_model(output_dir)
        return {
            "deepspeed": trainer.is_deepspeed_enabled,
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
            "world_size": trainer.accelerator.num_processes,
            "global_step": trainer.state.global_step,
            "trainable": sorted(name for name, p in module.named_parameters() if p.requires_grad),
            "before": before,
            "after": after,
            "log_history": trainer.state.log_history,
            "rollouts": rollouts,
            "output_dir": output_dir,
        }
    finally:
        trainer_module.diffusion_generate = original_generate


def _deepspeed_worker(rank: int, out_dir: str) -> dict:
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    import deepspeed.comm.torch
    from accelerate import PartialState

    deepspeed.comm.torch.build_shm_op = lambda: None  # see the module docstring: not used by ZeRO training
    PartialState(backend="gloo")
    results = {}
    for case in CASES:  # a case that raises (on both ranks alike) fails its own tests only
        try:
            results[case.name] = _train_case(rank, out_dir, case)
        except Exception:
            results[case.name] = {"error": traceback.format_exc()}
    return results


class _CaseRuns(dict):
    def __getitem__(self, name: str) -> list[dict]:
        runs = super().__getitem__(name)
        errors = [f"rank {rank}: {run['error']}" for rank, run in enumerate(runs) if "error" in run]
        if errors:
            pytest.fail(f"case {name} failed:\n" + "\n".join(errors))
        return runs


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """Per case, the two ranks' results (a case that raised fails the test that reads it, with its traceback)."""
    ranks = _spawn(_deepspeed_worker, tmp_path_factory.mktemp("deepspeed"), timeout_s=SPAWN_TIMEOUT_S)
    return _CaseRuns({case.name: [rank[case.name] for rank in ranks] for case in CASES})


CASE_NAMES = [case.name for case in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_both_ranks_finish_under_the_requested_zero_stage(deepspeed_runs, case):
    for run in deepspeed_runs[case.name]:
        assert run["deepspeed"] and run["zero_stage"] == case.stage
        assert run["world_size"] == WORLD_SIZE
        assert run["global_step"] == TRAIN_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_gathered_weights_are_equal_across_ranks_and_trained(deepspeed_runs, case):
    rank0, rank1 = deepspeed_runs[case.name]
    assert rank0["trainable"] == rank1["trainable"]
    head = [name for name in rank0["trainable"] if name.startswith("diffpo_sampler_head.")]
    dllm = [name for name in rank0["trainable"] if not name.startswith("diffpo_sampler_head.")]
    assert head and dllm
    if case.lora:
        assert all("lora_" in name for name in dllm)
    else:
        assert any("embed_tokens" in name for name in dllm)
    for name in rank0["after"]:
        assert torch.equal(rank0["before"][name], rank1["before"][name]), name
        assert torch.equal(rank0["after"][name], rank1["after"][name]), name
    for group in (head, dllm):  # the head and the dLLM both moved
        assert any(not torch.equal(rank0["before"][name], rank0["after"][name]) for name in group), group
    frozen = set(rank0["after"]) - set(rank0["trainable"])
    assert all(torch.equal(rank0["before"][name], rank0["after"][name]) for name in frozen)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_rollout_metrics_are_gathered_across_ranks(deepspeed_runs, case):
    runs = deepspeed_runs[case.name]
    first_log = [next(entry for entry in run["log_history"] if "diffusion/nfe/mean" in entry) for run in runs]
    both = torch.cat([run["rollouts"][0]["nfe"].float() for run in runs])
    for entry in first_log:
        assert entry["diffusion/nfe/mean"] == pytest.approx(both.mean().item())
        assert entry["diffusion/nfe/max"] == pytest.approx(both.max().item())
    for run in runs:  # the head's loss and thresholds are logged too
        assert any("sampler_head/loss" in entry for entry in run["log_history"])
    assert first_log[0]["reward"] == pytest.approx(first_log[1]["reward"])


@pytest.mark.slow
def test_zero3_without_gathering_keeps_collective_forwards_in_step(deepspeed_runs):
    slow, fast = deepspeed_runs["zero3_synced_lora"]
    assert len(slow["rollouts"]) == len(fast["rollouts"]) == TRAIN_STEPS
    num_blocks = GEN_LENGTH // BLOCK_LENGTH
    for slow_rollout, fast_rollout in zip(slow["rollouts"], fast["rollouts"], strict=True):
        # the set-up really needs different step counts: rank 1 commits a whole block per step ...
        # (a row may also stop earlier at an EOS)
        assert int(fast_rollout["nfe"].max()) <= num_blocks
        assert int(slow_rollout["nfe"].max()) > num_blocks
        # ... yet both ranks issued as many forwards as the slowest rank needed
        assert slow_rollout["forwards"] == fast_rollout["forwards"] == int(slow_rollout["nfe"].max())


def _load_saved_model(case: Case, output_dir: str):
    from trl_diffpo.tiny import build_char_tokenizer

    if case.lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(_build_model(build_char_tokenizer()), output_dir)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_saved_model_and_head_equal_the_gathered_weights(deepspeed_runs, case):
    from trl_diffpo import load_sampler_head

    rank0 = deepspeed_runs[case.name][0]
    trained = rank0["after"]
    saved = dict(_load_saved_model(case, rank0["output_dir"]).named_parameters())
    dllm = [name for name in trained if not name.startswith("diffpo_sampler_head.")]
    assert set(dllm) <= set(saved)
    for name in dllm:
        assert torch.equal(saved[name], trained[name]), name
    head = load_sampler_head(rank0["output_dir"])
    for name, value in head.state_dict().items():
        assert torch.equal(value, trained[f"diffpo_sampler_head.{name}"]), name
    assert not any(name.startswith("diffpo_sampler_head.") for name in saved)  # the head has its own files


# --------------------------------------------------------------------------------------------------------------------
# the user-facing route: `trl-diffpo train --accelerate_config zero3 --num_processes 2` on a machine without a GPU

CLI_TIMEOUT_S = 420


@pytest.mark.slow
def test_cli_accelerate_config_zero3_trains_on_two_cpu_processes(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU route; a GPU machine launches the usual way")
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "trl_diffpo", "train",
        "--accelerate_config", "zero3", "--num_processes", str(WORLD_SIZE), "--main_process_port", str(_free_port()),
        "--config", str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
        "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "No GPU found: running DeepSpeed on 2 CPU processes with the gloo backend" in result.stderr
    # a DeepSpeed engine checkpoint of stage 3, written by two ranks, and the saved model beside the head
    engine_folder = output_dir / "checkpoint-2" / "global_step2"
    states = torch.load(engine_folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert states["ds_config"]["zero_optimization"]["stage"] == 3
    per_device = yaml.safe_load((ROOT / "examples" / "configs" / "tiny_cpu.yaml").read_text())[
        "per_device_train_batch_size"
    ]
    assert states["ds_config"]["train_batch_size"] == per_device * WORLD_SIZE
    assert sorted(path.name for path in engine_folder.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(WORLD_SIZE)
    ]
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "sampler_head.safetensors").is_file()
