"""Multi-process correctness (issue 8): real 2-process gloo runs on CPU.

- ``synced_gpus`` decoding: ranks whose adaptive samplers finish at different times still issue the same number of
  forward passes (under ZeRO-3 without weight gathering every forward is a collective; a rank that stopped early
  would hang the others), without changing any rank's result.
- A few ``DiffpoTrainer`` steps on 2 processes with an adaptive sampler and the ``SamplerHeadCallback``: both ranks
  finish, metrics are gathered, the head's weights are identical on both ranks afterwards.

Each test spawns 2 fresh processes (``torch.multiprocessing`` with the gloo backend) and collects per-rank results
through files; a worker that fails writes its traceback, which the test re-raises with the rank.
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


def _spawn(body, out_dir, *args) -> list:
    """Run ``body`` on ``WORLD_SIZE`` processes; return the per-rank results (re-raising any worker failure)."""
    port = _free_port()
    context = mp.start_processes(
        _run_guarded, args=(body, port, str(out_dir), *args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=SPAWN_TIMEOUT_S):
            if not all(process.is_alive() for process in context.processes):
                continue
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE}-process run did not finish within {SPAWN_TIMEOUT_S} s (hang)")
    except mp.ProcessRaisedException as error:
        errors = [str(error)] + [
            f"rank {rank}:\n" + open(os.path.join(out_dir, f"rank{rank}.error")).read()
            for rank in range(WORLD_SIZE)
            if os.path.exists(os.path.join(out_dir, f"rank{rank}.error"))
        ]
        pytest.fail("a worker failed:\n" + "\n".join(errors))
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]


# --------------------------------------------------------------------------------------------------------------------
# synced_gpus decoding


def _tiny_decoder():
    from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=0)
    input_ids = torch.tensor([tokenizer.encode(PROMPT_TEXT)] * 2)
    return tokenizer, model, input_ids


def _decode(model, input_ids, threshold: float, synced_gpus: bool):
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
    )


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
    return result


@pytest.fixture(scope="module")
def decoding_runs(tmp_path_factory):
    """Per-rank results of one 2-process decoding run (spawned once for the tests below)."""
    return _spawn(_decoding_worker, tmp_path_factory.mktemp("decoding"))


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
def test_without_synced_gpus_ranks_make_different_forward_counts(decoding_runs):
    """The control: without ``synced_gpus`` the fast rank stops early (what would hang a ZeRO-3 run)."""
    ranks = [run[False] for run in decoding_runs]
    assert ranks[0]["forward_calls"] == GEN_LENGTH // BLOCK_LENGTH
    assert ranks[1]["forward_calls"] == GEN_LENGTH
