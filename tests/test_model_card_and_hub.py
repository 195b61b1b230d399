"""Hub pushes carry the sampler head (every push, recorded with a fake HfApi, offline) and the model card names the
base model, the data and the DiFFPO settings, reports the end-of-training numbers and has a quick start that runs."""

import concurrent.futures
import os
import re

import pytest
from datasets import Dataset

from test_trainer import PROMPTS, text_reward, tiny_args
from trl_diffpo import DiffpoTrainer, SamplerHeadCallback
from trl_diffpo.sampler_head import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME
from trl_diffpo.tiny import build_char_tokenizer, build_tiny_model

HEAD_FILES = {HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME}


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records what each upload would send (file names and README text)."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"someone/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, **kwargs):
        files = set()
        for root, dirs, names in os.walk(folder_path):
            dirs[:] = [d for d in dirs if not d.startswith(("checkpoint-", "_"))] if path_in_repo is None else dirs
            files.update(os.path.relpath(os.path.join(root, n), folder_path) for n in names if not n.startswith("_"))
        readme = os.path.join(folder_path, "README.md")
        self.uploads.append(
            {
                "path_in_repo": path_in_repo,
                "files": files,
                "readme": open(readme, encoding="utf-8").read() if os.path.isfile(readme) else None,
                "message": kwargs.get("commit_message"),
            }
        )
        future = concurrent.futures.Future()
        future.set_result(None)
        return future


def any_text_reward(completions, **kwargs):
    """`text_reward` for plain and conversational completions."""
    return text_reward([c if isinstance(c, str) else c[-1]["content"] for c in completions])


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def head_trainer(tokenizer, output_dir, callbacks=True, model=None, prompts=PROMPTS, **overrides):
    options = {"sampler": "entropy_bounded", "threshold": 1.0, "max_steps": 2, "num_iterations": 1}
    options.update(overrides)
    model = model or build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    return DiffpoTrainer(
        model=model,
        reward_funcs=any_text_reward,
        args=tiny_args(output_dir, **options),
        train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
        processing_class=tokenizer,
        callbacks=[SamplerHeadCallback(nfe_penalty=0.25, mlp_hidden_size=8)] if callbacks else None,
    )


@pytest.mark.parametrize("hub_strategy", ["every_save", "checkpoint"])
def test_every_push_carries_the_sampler_head_and_the_card(tokenizer, tmp_path, monkeypatch, hub_strategy):
    api = RecordingHfApi()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: api)
    trainer = head_trainer(
        tokenizer,
        tmp_path,
        push_to_hub=True,
        hub_model_id="someone/tiny-diffpo",
        hub_strategy=hub_strategy,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    trainer.push_to_hub(dataset_name="sudoku")
    root_pushes = [upload for upload in api.uploads if upload["path_in_repo"] is None]
    assert [u["message"] for u in root_pushes] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
        "End of training",
    ]
    for upload in api.uploads:  # the repo root and, with hub_strategy="checkpoint", last-checkpoint/
        assert HEAD_FILES <= upload["files"], upload
        assert "model.safetensors" in upload["files"]
    for upload in root_pushes:
        assert "sampler head" in upload["readme"] and "diffusion_generate" in upload["readme"]
    if hub_strategy == "checkpoint":
        checkpoint_pushes = [u for u in api.uploads if u["path_in_repo"] == "last-checkpoint"]
        assert len(checkpoint_pushes) == 2
        assert all("diffpo_state.pt" in u["files"] for u in checkpoint_pushes)


def test_card_names_base_model_data_settings_and_results(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    model.config._name_or_path = "someone/tiny-base"
    trainer = head_trainer(tokenizer, tmp_path, callbacks=False, model=model, sampler="low_confidence", threshold=None)
    trainer.train()  # save_strategy="no": the card is still written at the end of training
    card = (tmp_path / "README.md").read_text()
    assert "base_model: someone/tiny-base" in card and "(https://huggingface.co/someone/tiny-base)" in card
    assert "https://huggingface.co/None" not in card and "pipeline(" not in card
    assert "a dataset passed to the trainer (8 prompts, columns `prompt`)" in card
    for row in (
        "| surrogate likelihood | two_stage |",
        "| importance-sampling correction / clamp | token / 2.0 |",
        "| sampler | low_confidence |",
        "| denoising steps | 4 |",
        "| optimizer steps trained | 2 |",
    ):
        assert row in card, row
    last = trainer.state.log_history[-2]  # the last step's metrics (the final entry is the run summary)
    assert (
        f"| NFE per completion (forward passes) | {trainer.state.log_history[0]['diffusion/nfe/mean']:.4g} (step 1)"
        in card
    )
    assert f"{last['reward']:.4g} (step 2) |" in card
    trainer.create_model_card(dataset_name="gsm8k")  # a task name links the Hub dataset it loads
    card = (tmp_path / "README.md").read_text()
    assert "- openai/gsm8k" in card and "(https://huggingface.co/datasets/openai/gsm8k)" in card


@pytest.mark.parametrize(
    ("use_peft", "chat"), [(False, False), (True, False), (False, True)], ids=["model", "lora_adapter", "chat_prompts"]
)
def test_card_quick_start_runs(tokenizer, tmp_path, capsys, use_peft, chat):
    output_dir = tmp_path / "run"
    model = build_tiny_model(tokenizer, architecture="llama", hidden_size=32, num_layers=1, seed=1)
    peft_config = None
    if use_peft:  # a base model with a path, as from_pretrained leaves it
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    prompts = [[{"role": "user", "content": prompt}] for prompt in PROMPTS] if chat else PROMPTS
    trainer = head_trainer(tokenizer, output_dir, model=model, prompts=prompts, max_steps=1)
    if use_peft:
        trainer = DiffpoTrainer(
            model=model,
            reward_funcs=text_reward,
            args=trainer.args,
            train_dataset=trainer.train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[SamplerHeadCallback(nfe_penalty=0.25, mlp_hidden_size=8)],
        )
    trainer.train()
    trainer.save_model(str(output_dir))
    card = (output_dir / "README.md").read_text()
    assert "| head NFE penalty (lambda) | 0.25 |" in card
    assert ("messages = [{'role': 'user', 'content': '1+2='}]" in card) == chat
    if use_peft:
        assert "library_name: peft" in card and "| adapter | LORA r=4, alpha=8" in card
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})  # repo_id is the output folder: no Hub access
    printed = capsys.readouterr().out
    assert "forward passes:" in printed and "threshold:" in printed
