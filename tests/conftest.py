"""Shared fixtures: a tiny random SD pipeline and Pick-a-Pic data from the synthetic world, saved once per session."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the cores are shared among the N workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(items):
    """Learning tests (marked slow) first: parallel workers (pytest -n --dist loadfile) start the longest files
    early instead of ending on one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _free_port() -> str:
    """A port of its own for one launch (launch tests may run side by side under pytest -n)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture
def cpu_launch():
    """The `accelerate launch` command for two data-parallel CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            _free_port()]


@pytest.fixture(scope="session")
def config_launch():
    """`config_launch(name)`: the `accelerate launch` command of the shipped config
    mmalign/accelerate_configs/<name>.yaml for two processes (with ACCELERATE_USE_CPU=1 on a machine without GPUs)."""
    from importlib.resources import files

    def command(name):
        config = files("mmalign") / "accelerate_configs" / f"{name}.yaml"
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                "2", "--main_process_port", _free_port()]
    return command


class Launcher:
    """Two-process runs of `mmalign` under a shipped accelerate config, on the CPU: FSDP and DDP with
    ACCELERATE_USE_CPU=1, DeepSpeed without it (it finds no GPU and runs on the CPU itself, `sharding.options`)."""

    def __init__(self, command):
        self.command = command

    @staticmethod
    def env(name):
        """The environment of a launch of the config `name` on the CPU."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        if name.startswith("zero"):
            del env["ACCELERATE_USE_CPU"]
        return env

    def __call__(self, name, *args):
        result = subprocess.run([*self.command(name), "-m", "mmalign", *map(str, args)], env=self.env(name),
                                capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def resumed(self, name, run, *args):
        """The run folder `run` copied without its checkpoint-2, its model and its later metrics, then resumed from
        checkpoint-1 by a launch of `name` with `args`; returns the copy."""
        again = run.parent / f"{run.name}-resumed-{name}"
        later = {"checkpoint-2", "unet", "pytorch_lora_weights.safetensors"}
        shutil.copytree(run, again, ignore=lambda folder, names: later & set(names)
                        if folder in (str(run), str(run / "checkpoints")) else set())
        (again / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
        self(name, *args, "--output", again, "--resume", "latest")
        return again

    @staticmethod
    def losses(run):
        """The loss of every logged step of the run folder `run`."""
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def launch(config_launch):
    """`launch(config, *mmalign_args)`: a two-process run (`Launcher`); `launch.losses(folder)` its losses."""
    return Launcher(config_launch)


def _snapshot(path):
    """Every file under `path` with its size and modification time (None when `path` does not exist)."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.stat(path).st_size, os.stat(path).st_mtime_ns
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture
def refused(capsys):
    """`refused(*argv, output=PATH)` runs `mmalign argv` in-process and returns its error message, asserting a clean
    refusal: exit code 1 or 2, no traceback (a bug raises out of `main` and fails the test), and nothing written to
    `output` (still absent, or unchanged file for file)."""
    from mmalign.cli import main

    def run(*argv, output=None):
        before = _snapshot(output)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:  # argparse refuses a flag's value
            code = exit.code
        captured = capsys.readouterr()
        assert code in (1, 2), f"exit code {code}; stderr: {captured.err[-2000:]}"
        assert "Traceback" not in captured.err + captured.out
        assert _snapshot(output) == before, f"{output} was written to"
        return captured.err
    return run


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight tiny LLaVA (model and processor) saved with save_pretrained."""
    from mmalign.vision.tiny import tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """`tiny_family(kind)`: the folder of a saved tiny pipeline of `mmalign.diffusion.tiny.KINDS` (sd3, sd35, flux,
    ...), built on first use and shared by the session."""
    from mmalign.diffusion.tiny import tiny_pipeline

    folders = {}

    def folder(kind):
        if kind not in folders:
            folders[kind] = tmp_path_factory.mktemp(f"tiny-{kind}")
            tiny_pipeline(kind=kind).save_pretrained(folders[kind])
        return folders[kind]
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tiny_family):
    """A random-weight tiny StableDiffusionPipeline saved with save_pretrained (loaded back by the code under test)."""
    return tiny_family("sd")


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """24 Pick-a-Pic rows from the synthetic world (some ties), as Parquet."""
    from mmalign.diffusion.data import write_pickapic
    from mmalign.diffusion.world import preference_pairs

    return write_pickapic(preference_pairs(24, seed=3), tmp_path_factory.mktemp("prefs") / "train.parquet")


class Embedded:
    """The embedded tiny model with the demo's full fine-tune settings, and the held-out placement gain of a run."""

    def config(self, method, output, **overrides):
        """`method.Config` with the demo's training settings (`mmalign.diffusion.demo.embedded_config`)."""
        from mmalign.diffusion.demo import embedded_config

        return embedded_config(method, output, **overrides)

    def pipelines(self, config):
        """(base, tuned) pipelines of a run: the tuned one is its pipeline folder (--full) or the base with its LoRA."""
        from mmalign.diffusion.models import load_pipeline, sampling_pipeline

        base = load_pipeline(config.model)
        tuned = (load_pipeline(config.output) if config.full
                 else sampling_pipeline(str(config.model), lora=config.output))
        for pipe in (base, tuned):
            pipe.set_progress_bar_config(disable=True)
        return base, tuned

    def gain(self, config, seed: int, per_prompt: int = 4, steps: int = 20):
        """Paired held-out placement gain of config.output over config.model on the 12 captions: (mean/CI, images)."""
        from mmalign.diffusion import world
        from mmalign.diffusion.evaluate import paired_gain

        base, tuned = self.pipelines(config)
        return paired_gain(base, tuned, list(world.CAPTIONS), world.reward, per_prompt=per_prompt, seed=seed,
                           steps=steps)

    def reward_run_summary(self, config, seed: int = 2000, per_prompt: int = 6, steps: int = 10) -> dict:
        """What a run trained on the world's reward must move and keep, on per_prompt fixed-seed samples of each
        caption: the paired placement gain (mean/CI), the tuned colour match, and tuned / base diversity."""
        from mmalign.diffusion import acflow, world
        from mmalign.diffusion.evaluate import evaluate_reward
        from mmalign.stats import mean_ci

        captions = list(world.CAPTIONS)
        (_, base, base_images), (_, tuned, images) = (
            evaluate_reward(pipe, captions, world.reward, per_prompt=per_prompt, seed=seed, steps=steps)
            for pipe in self.pipelines(config))
        expanded = [c for c in captions for _ in range(per_prompt)]
        return {"gain": mean_ci(tuned - base), "colour_match": world.colour_match(images, expanded).mean().item(),
                "diversity_ratio": (acflow.diversity(images, per_prompt)
                                    / acflow.diversity(base_images, per_prompt)).item()}


@pytest.fixture(scope="session")
def embedded():
    return Embedded()


@pytest.fixture(scope="session")
def aligned_tiny_sd(tmp_path_factory, embedded):
    """The embedded tiny model after 300 full Diffusion-DPO steps (the demo's settings): (config, history)."""
    from mmalign.diffusion import dpo

    cfg = embedded.config(dpo, tmp_path_factory.mktemp("aligned") / "run")
    return cfg, dpo.run(cfg)


@pytest.fixture(scope="session")
def button_press(tmp_path_factory):
    """Noisy-expert button-press-v3 rollouts (60 steps): 40 training and 20 held-out episodes, as trajectory files."""
    from mmalign.robotics import collect

    root = tmp_path_factory.mktemp("button-press")
    common = dict(task="button-press-v3", noise=[0.0, 0.5, 1.0, 2.0, 3.0], max_episode_steps=60, num_envs=4)
    collect.run(collect.Config(output=root / "train.npz", episodes=40, seed=0, **common))
    collect.run(collect.Config(output=root / "eval.npz", episodes=20, seed=1, first_state=40, **common))
    return root


@pytest.fixture
def trl_step0(tmp_path):
    """`trl_step0(build, rows)` scores `rows` twice, with a policy `build(seed=0)` and a different reference
    `build(seed=1)` (each build returns (model, processor)): by `mmalign.vision` (shared-prompt `sequence_scores`, then
    `vision_dpo_loss`, beta 0.1) and by TRL's own DPOTrainer on fresh copies (its trainer patches the forward of the
    models it is given). Returns {'loss': (ours, TRL's), 'logps': (ours [B, 2], TRL's [B, 2])}, columns chosen,
    rejected; TRL's per-row log-probs are read from its policy forward (sum of `log_probs` over the completion)."""
    import datasets
    import torch
    trl = pytest.importorskip("trl")

    from mmalign.vision import dpo
    from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
    from mmalign.vision.scoring import sequence_scores

    def run(build, rows):
        policy, processor = build(seed=0)
        reference, _ = build(seed=1)
        pairs = VisionPairs.load(write_rows(rows, tmp_path / "trl_rows.parquet"), processor)
        batch = collate_pairs([pairs[i] for i in range(len(pairs))], processor.tokenizer.pad_token_id)
        ours = sequence_scores(policy, batch)
        with torch.no_grad():
            ref = sequence_scores(reference, batch)
        config = dpo.Config(model="-", data="-", output=tmp_path / "run", beta=0.1)
        loss, _ = dpo.vision_dpo_loss(ours, ref, batch["completion_lengths"], config)

        args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), report_to=[],
                             beta=0.1, max_length=None, use_cpu=True, bf16=False)
        trainer = trl.DPOTrainer(model=build(seed=0)[0], ref_model=build(seed=1)[0], args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
        trainer.model.train()
        forwards = []
        trainer.model.register_forward_hook(lambda m, args, out: forwards.append(out.log_probs.detach().sum(1)))
        expected = trainer.compute_loss(trainer.model, trainer.data_collator([dict(r) for r in rows]))
        return {"loss": (loss.mean().detach(), expected.detach()),
                "logps": (ours.detach(), forwards[0].view(2, -1).T)}
    return run
