"""Multi-process correctness (issue 8): real 2-process gloo runs on CPU.

- ``synced_gpus`` decoding: ranks whose adaptive samplers finish at different times still issue the same number of
  forward passes (under ZeRO-3 without weight gathering every forward is a collective; a rank that stopped early
  would hang the others), without changing any rank's result.
- A few ``DiffpoTrainer`` steps on 2 processes with an adaptive sampler and the ``SamplerHeadCallback``: both ranks
  finish, metrics are gathered, the head's weights are identical on both ranks afterwards.

The module spawns 2 fresh processes once (``torch.multiprocessing`` with the gloo backend; the trainer's accelerate
state sees ``WORLD_SIZE=2`` on CPU and uses the same group), collects per-rank results through files and checks them
in separate tests; a worker that fails writes its traceback, which the tests report with the rank.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 240  # generous: the CI machine has 2 shared cores; a hang is what this file guards against

PROMPT_TEXT = "12+34="
GEN_LENGTH = 16
BLOCK_LENGTH = 8
# Confidence thresholds per rank: a near-zero threshold commits every masked position of a block in one step
# (NFE = number of blocks), a threshold of 1 commits exactly one position per step (NFE = GEN_LENGTH).
FAST_THRESHOLD = 1e-6
SLOW_THRESHOLD = 1.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def _run_guarded(rank: int, body, port: int, out_dir: str, *args) -> None:
    """Run ``body(rank, out_dir, *args)`` in an initialised process group; save its result or its traceback."""
    try:
        _init_process_group(rank, port)
        result = body(rank, out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:  # report everything (even KeyboardInterrupt) to the parent
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(body, out_dir, *args, timeout_s: float = SPAWN_TIMEOUT_S) -> list:
    """Run ``body`` on ``WORLD_SIZE`` processes; return the per-rank results (re-raising any worker failure)."""
    port = _free_port()
    context = mp.start_processes(
        _run_guarded, args=(body, port, str(out_dir), *args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=timeout_s):
            if not all(process.is_alive() for process in context.processes):
                continue
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE}-process run did not finish within {timeout_s} s (hang)")
    except mp.ProcessRaisedException as error:
        errors = [str(error)] + [
            f"rank {rank}:\n" + open(os.path.join(out_dir, f"rank{rank}.error")).read()
            for rank in range(WORLD_SIZE)
            if os.path.exists(os.path.join(out_dir, f"rank{rank}.error"))
        ]
        pytest.fail("a worker failed:\n" + "\n".join(errors))
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]


def _worker(rank: int, out_dir: str) -> dict:
    """Everything the tests below check, in one 2-process run (spawning costs more than the work itself)."""
    return {"decoding": _decoding_worker(rank, out_dir), "trainer": _trainer_worker(rank, out_dir)}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Per-rank results of the 2-process run."""
    return _spawn(_worker, tmp_path_factory.mktemp("two_process"))


@pytest.fixture
def decoding_runs(two_process_runs):
    return [run["decoding"] for run in two_process_runs]


@pytest.fixture
def trainer_runs(two_process_runs):
    return [run["trainer"] for run in two_process_runs]


# --------------------------------------------------------------------------------------------------------------------
# synced_gpus decoding


def _tiny_decoder():
    from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=0)
    input_ids = torch.tensor([tokenizer.encode(PROMPT_TEXT)] * 2)
    return tokenizer, model, input_ids


def _decode(model, input_ids, threshold, synced_gpus: bool, cache: str = "none", **policy):
    from trl_diffpo.generation import diffusion_generate

    return diffusion_generate(
        model,
        input_ids,
        gen_length=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        sampler="confidence_threshold",
        threshold=threshold,
        temperature=0.0,
        synced_gpus=synced_gpus,
        cache=cache,
        **policy,
    )


def _cached_thresholds(rank: int) -> torch.Tensor:
    """Per-row thresholds for the cached run: rank 0's rows move at different paces (several forward calls a step
    with cache="prefix"), rank 1's rows together."""
    return torch.tensor([FAST_THRESHOLD, SLOW_THRESHOLD]) if rank == 0 else torch.tensor([0.5, 0.5])


def _decoding_worker(rank: int, out_dir: str) -> dict:
    """Decode with this rank's threshold twice: with and without ``synced_gpus``, counting model forwards."""
    _, model, input_ids = _tiny_decoder()
    forward_calls = []
    model.register_forward_hook(lambda module, args, output: forward_calls.append(1))
    threshold = FAST_THRESHOLD if rank == 0 else SLOW_THRESHOLD
    result = {}
    for synced_gpus in (True, False):
        forward_calls.clear()
        output = _decode(model, input_ids, threshold, synced_gpus)
        result[synced_gpus] = {"forward_calls": len(forward_calls), "nfe": output.nfe, "sequences": output.sequences}
        dist.barrier()
    forward_calls.clear()
    output = _decode(model, input_ids, _cached_thresholds(rank), True, cache="prefix")
    result["prefix"] = {"forward_calls": len(forward_calls), "nfe": output.nfe, "sequences": output.sequences}
    dist.barrier()
    forward_calls.clear()  # a state-dependent policy (a decision per step, none in the padding forwards)
    output = _decode(model, input_ids, None, True, step_threshold_fn=_constant_step_policy(threshold))
    result["step_policy"] = {"forward_calls": len(forward_calls), "nfe": output.nfe, "sequences": output.sequences}
    result["step_policy"]["decisions"] = output.step_valid.sum(1)
    dist.barrier()
    return result


def _constant_step_policy(threshold: float):
    def policy(prompt_hidden, step_features):
        return torch.full((step_features.shape[0],), threshold)

    return policy


@pytest.mark.slow
def test_synced_gpus_keeps_forward_counts_equal_across_ranks(decoding_runs):
    ranks = [run[True] for run in decoding_runs]
    _, model, input_ids = _tiny_decoder()
    reference = {
        rank: _decode(model, input_ids, FAST_THRESHOLD if rank == 0 else SLOW_THRESHOLD, False) for rank in (0, 1)
    }

    num_blocks = GEN_LENGTH // BLOCK_LENGTH
    assert reference[0].nfe.tolist() == [num_blocks, num_blocks]  # the set-up really finishes at different times
    assert reference[1].nfe.tolist() == [GEN_LENGTH, GEN_LENGTH]
    # every rank made as many forward calls as the slowest rank needed ...
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] == GEN_LENGTH
    # ... while each rank's own result and NFE count are those of an unsynchronised single-process run
    for rank in (0, 1):
        assert torch.equal(ranks[rank]["nfe"], reference[rank].nfe)
        assert torch.equal(ranks[rank]["sequences"], reference[rank].sequences)


@pytest.mark.slow
def test_synced_gpus_with_a_cache_keeps_forward_calls_equal_across_ranks(decoding_runs):
    """With cache="prefix" a step may take several forward calls (rows in different blocks): the ranks still make the
    same number, and each rank decodes as it would alone."""
    ranks = [run["prefix"] for run in decoding_runs]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"]
    _, model, input_ids = _tiny_decoder()
    for rank in (0, 1):
        alone = _decode(model, input_ids, _cached_thresholds(rank), False, cache="prefix")
        assert torch.equal(ranks[rank]["nfe"], alone.nfe)
        assert torch.equal(ranks[rank]["sequences"], alone.sequences)
    assert ranks[0]["nfe"].tolist()[0] != ranks[0]["nfe"].tolist()[1]  # rank 0's rows really moved apart


@pytest.mark.slow
def test_synced_gpus_with_a_step_policy_records_only_the_real_steps(decoding_runs):
    """step_threshold_fn is called per real step only: the ranks stay in step, and each rank's decisions and result
    are those of its own fixed-threshold decoding."""
    ranks = [run["step_policy"] for run in decoding_runs]
    assert ranks[0]["forward_calls"] == ranks[1]["forward_calls"] == GEN_LENGTH
    for rank in (0, 1):
        fixed = decoding_runs[rank][True]
        assert torch.equal(ranks[rank]["nfe"], fixed["nfe"]) and torch.equal(ranks[rank]["decisions"], fixed["nfe"])
        assert torch.equal(ranks[rank]["sequences"], fixed["sequences"])


@pytest.mark.slow
def test_without_synced_gpus_ranks_make_different_forward_counts(decoding_runs):
    """The control: without ``synced_gpus`` the fast rank stops early (what would hang a ZeRO-3 run)."""
    ranks = [run[False] for run in decoding_runs]
    assert ranks[0]["forward_calls"] == GEN_LENGTH // BLOCK_LENGTH
    assert ranks[1]["forward_calls"] == GEN_LENGTH


# --------------------------------------------------------------------------------------------------------------------
# DiffpoTrainer steps with an adaptive sampler and the sampler head on 2 processes

TRAIN_PROMPTS = ["12+34=", "7*8=", "90-45=", "3+3+3=", "81/9=", "5*5-1=", "64+1=", "2*2*2="]
NUM_GENERATIONS = 2
PER_DEVICE_BATCH = 2
TRAIN_STEPS = 2


def _digit_fraction_reward(prompts, completions, **kwargs):
    """A cheap reward that varies across random completions (so advantages, and gradients, are not zero)."""
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in completions]


def _trainer_worker(rank: int, out_dir: str) -> dict:
    from datasets import Dataset

    import trl_diffpo.sampler_head.checkpoints as sampler_head_module  # where save_head looks save_sampler_head up
    import trl_diffpo.trainer_rollouts as trainer_module  # where the rollouts call diffusion_generate
    from trl_diffpo import DiffpoConfig, DiffpoTrainer, SamplerHeadCallback
    from trl_diffpo.likelihood import draw_surrogate_randomness
    from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

    local_rollouts = []  # (nfe, threshold) of every rollout on this rank
    original_generate = trainer_module.diffusion_generate

    def recording_generate(*args, **kwargs):
        output = original_generate(*args, **kwargs)
        local_rollouts.append((output.nfe.clone(), output.threshold.clone()))
        return output

    trainer_module.diffusion_generate = recording_generate
    head_saves = []
    original_save = sampler_head_module.save_sampler_head

    def counting_save(*args, **kwargs):
        head_saves.append(str(args[1]))
        return original_save(*args, **kwargs)

    sampler_head_module.save_sampler_head = counting_save
    local_prompts = []

    def recording_reward(prompts, completions, **kwargs):
        local_prompts.append(list(prompts))
        return _digit_fraction_reward(prompts, completions)

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=0)
    config = {
        "per_device_train_batch_size": PER_DEVICE_BATCH,
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": 16,
        "block_length": 8,
        "sampler": "entropy_bounded",
        "threshold": 0.5,
        "temperature": 0.9,
        "num_iterations": 1,
        "beta": 0.0,
        "max_steps": TRAIN_STEPS,
        "learning_rate": 1e-2,
        "bf16": False,
        "use_cpu": True,
        "activation_checkpointing": False,
        # ddp_find_unused_parameters left at None: without gradient checkpointing the Trainer would pick True, which
        # breaks the head (its loss is outside the model's forward); the callback must switch it off
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    args = DiffpoConfig(output_dir=os.path.join(out_dir, "run"), **config)
    callback = SamplerHeadCallback(mode="joint", nfe_penalty=0.5, mlp_hidden_size=8, threshold_max=2.0)
    trainer = DiffpoTrainer(
        model=model,
        reward_funcs=recording_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    head_before = {name: value.detach().clone() for name, value in callback.head.state_dict().items()}
    trainer.train()
    trainer.save_model(args.output_dir)
    # the same inputs on both ranks: exploration noise and rollout sampling must still differ per rank
    probe_hidden = torch.zeros(4, model.config.hidden_size)
    probe_thresholds = callback.threshold_fn(probe_hidden)
    trainer.model.train()
    probe_completions, _ = trainer._generate_single_turn([tokenizer.encode(TRAIN_PROMPTS[0])] * 4, None, None, 1)
    probe_draws = draw_surrogate_randomness(
        torch.ones(4, 6, dtype=torch.long),
        torch.full((4,), 16),
        likelihood="two_stage",
        num_stages=None,
        p_mask_prompt=0.5,
        num_iterations=2,
        generator=trainer._surrogate_generator,
    )
    model_after = {
        name: value.detach().clone()
        for name, value in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
        if not name.startswith("diffpo_sampler_head.")
    }

    # sampler_only: the dLLM is frozen and DDP wraps a model whose only trainable part is the head
    frozen_model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=0)
    initial_dllm = {name: value.detach().clone() for name, value in frozen_model.named_parameters()}
    head_only = SamplerHeadCallback(mode="sampler_only", nfe_penalty=0.5, mlp_hidden_size=8, threshold_max=2.0)
    frozen_trainer = DiffpoTrainer(
        model=frozen_model,
        reward_funcs=_digit_fraction_reward,
        args=DiffpoConfig(output_dir=os.path.join(out_dir, "sampler_only"), **{**config, "max_steps": 1}),
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
        processing_class=tokenizer,
        callbacks=[head_only],
    )
    head_only_before = {name: value.detach().clone() for name, value in head_only.head.state_dict().items()}
    frozen_trainer.train()
    frozen_after = frozen_trainer.accelerator.unwrap_model(frozen_trainer.model).named_parameters()
    sampler_only = {
        "head_before": head_only_before,
        "head_after": {name: value.detach().clone() for name, value in head_only.head.state_dict().items()},
        "dllm_unchanged": all(
            torch.equal(initial_dllm[name], value) for name, value in frozen_after if name in initial_dllm
        ),
    }
    return {
        "sampler_only": sampler_only,
        "world_size": trainer.accelerator.num_processes,
        "head_before": head_before,
        "head_after": {name: value.detach().clone() for name, value in callback.head.state_dict().items()},
        "model_after": model_after,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "local_rollouts": local_rollouts,
        "local_prompts": local_prompts,
        "head_saves": head_saves,
        "probe_thresholds": probe_thresholds,
        "probe_completions": probe_completions,
        "probe_draws": (probe_draws.stage_starts, probe_draws.prompt_noise),
    }


@pytest.mark.slow
def test_two_process_training_finishes_on_both_ranks(trainer_runs):
    assert [run["world_size"] for run in trainer_runs] == [WORLD_SIZE, WORLD_SIZE]
    assert [run["global_step"] for run in trainer_runs] == [TRAIN_STEPS, TRAIN_STEPS]


@pytest.mark.slow
def test_sampler_head_weights_stay_equal_across_ranks_and_train(trainer_runs):
    rank0, rank1 = trainer_runs
    for name, before in rank0["head_before"].items():
        assert torch.equal(before, rank1["head_before"][name]), name
        assert torch.equal(rank0["head_after"][name], rank1["head_after"][name]), name
    assert any(not torch.equal(rank0["head_before"][n], rank0["head_after"][n]) for n in rank0["head_before"])
    for name, value in rank0["model_after"].items():
        assert torch.equal(value, rank1["model_after"][name]), name


@pytest.mark.slow
def test_rollout_metrics_are_gathered_across_ranks(trainer_runs):
    rank0, rank1 = trainer_runs
    first_log = [next(entry for entry in run["log_history"] if "diffusion/nfe/mean" in entry) for run in trainer_runs]
    # the logged NFE is the mean over BOTH ranks' rollouts of the first step, identical on both ranks ...
    local_nfe = [run["local_rollouts"][0][0].float() for run in trainer_runs]
    both = torch.cat(local_nfe)
    for entry in first_log:
        assert entry["diffusion/nfe/mean"] == pytest.approx(both.mean().item())
        assert entry["diffusion/nfe/max"] == pytest.approx(both.max().item())
    # ... and the reward too (TRL gathers it)
    assert first_log[0]["reward"] == pytest.approx(first_log[1]["reward"])


@pytest.mark.slow
def test_random_streams_differ_per_rank_while_prompt_order_is_shared(trainer_runs):
    rank0, rank1 = trainer_runs
    # identical weights and inputs on both ranks, yet the head's exploration noise, the Gumbel noise of the
    # rollouts and the surrogate's draws come from per-rank streams
    assert not torch.allclose(rank0["probe_thresholds"], rank1["probe_thresholds"])
    assert rank0["probe_completions"] != rank1["probe_completions"]
    # ... and so are the surrogate's cut points and prompt masks
    assert any(not torch.equal(a, b) for a, b in zip(rank0["probe_draws"], rank1["probe_draws"]))
    # TRL's sampler must order prompts identically on every rank: each step's prompts, over both ranks, are whole
    # groups of NUM_GENERATIONS copies of distinct prompts
    for step in range(TRAIN_STEPS):
        prompts = rank0["local_prompts"][step] + rank1["local_prompts"][step]
        counts = {prompt: prompts.count(prompt) for prompt in prompts}
        assert set(counts.values()) == {NUM_GENERATIONS}, counts


@pytest.mark.slow
def test_sampler_only_mode_trains_the_head_in_sync_and_leaves_the_dllm(trainer_runs):
    rank0, rank1 = (run["sampler_only"] for run in trainer_runs)
    for name in rank0["head_after"]:
        assert torch.equal(rank0["head_after"][name], rank1["head_after"][name]), name
    assert any(not torch.equal(rank0["head_before"][n], rank0["head_after"][n]) for n in rank0["head_before"])
    assert rank0["dllm_unchanged"] and rank1["dllm_unchanged"]


@pytest.mark.slow
def test_sampler_head_is_saved_once(trainer_runs):
    rank0, rank1 = trainer_runs
    assert len(rank0["head_saves"]) == 1
    assert rank1["head_saves"] == []
    assert os.path.isfile(os.path.join(rank0["head_saves"][0], "sampler_head.safetensors"))
