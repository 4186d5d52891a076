"""Video Diffusion-DPO: frame folders and video files, frame-count errors, per-frame encoding, the shared-noise
step on a tiny text-to-video model, and the objective moving the right way."""

import json
import math

import pytest
import torch

from mmalign.data import DataError
from mmalign.diffusion import base, dpo, pairwise, video
from mmalign.diffusion.data import collate_pairs
from mmalign.diffusion.models import load_pipeline
from mmalign.diffusion.tiny import tiny_pipeline
from mmalign.diffusion.world import render
from mmalign.trainer import Trainer, step_generator

FRAMES = 3


def write_clip(folder, start_x, step, as_gif=False, frames=FRAMES):
    """A red circle moving horizontally, as a folder of PNG frames or one GIF file."""
    images = [render("a red circle", start_x + i * step, 16, 6) for i in range(frames)]
    if as_gif:
        folder.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(folder.with_suffix(".gif"), save_all=True, append_images=images[1:], duration=100, loop=0)
        return folder.with_suffix(".gif").name
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:03d}.png")
    return folder.name


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rows = []
    for i in range(4):
        left = write_clip(root / f"left{i}", 10 - i, -1, as_gif=i == 0)
        right = write_clip(root / f"right{i}", 20 + i, 1)
        rows.append({"caption": "a red circle", "video_0": left, "video_1": right, "label_0": 1})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-video")
    tiny_pipeline(kind="video").save_pretrained(path)
    return path


def test_frame_folders_and_video_files_load(video_data):
    pairs = video.VideoPairs(video_data, resolution=32, num_frames=FRAMES)
    item = pairs[0]
    assert item["pixel_values"].shape == (2, FRAMES, 3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_wrong_frame_count_names_the_row(video_data, tmp_path):
    rows = [json.loads(x) for x in video_data.read_text().splitlines()]
    rows[2]["video_1"] = write_clip(video_data.parent / "short", 10, 1, frames=2)
    rows[3]["video_0"] = "missing"
    rows[1]["video_1"] = "short/000.png"
    bad = video_data.with_name("bad.jsonl")
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        video.VideoPairs(bad, resolution=32, num_frames=FRAMES)
    assert "record 2, field 'video_1': cannot be read (has 2 frames, expected 3" in str(err.value)
    assert "record 3, field 'video_0': cannot be read (video" in str(err.value)
    assert "record 1, field 'video_1': cannot be read (" in str(err.value)
    assert "short/000.png is one image, not a video" in str(err.value)


def test_video_paths_stay_inside_the_data_folder_unless_allowed(video_data, tmp_path):
    outside = write_clip(tmp_path / "outside", 10, 1)
    rows = [json.loads(x) for x in video_data.read_text().splitlines()]
    rows[0]["video_0"] = str(tmp_path / outside)
    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    with pytest.raises(DataError, match=r"record 0, field 'video_0': cannot be read \(video path: '.*outside' is an "
                                        "absolute path"):
        video.VideoPairs(data, resolution=32, num_frames=FRAMES)
    rows[0]["video_1"] = "../" + outside
    rows[0]["video_0"] = str(tmp_path / outside)
    data.write_text(json.dumps(rows[0]) + "\n")
    assert len(video.VideoPairs(data, resolution=32, num_frames=FRAMES, allow_outside_paths=True)) == 1


def test_video_latents_are_encoded_frame_by_frame(tiny_video, video_data):
    pipe = load_pipeline(tiny_video)
    pixels = collate_pairs([video.VideoPairs(video_data, resolution=32, num_frames=FRAMES)[0]])["pixel_values"]
    mean, std = pairwise.encode_pairs(pipe.vae, pixels, torch.float32)
    assert mean.shape == (2, 4, FRAMES, 16, 16)
    with torch.no_grad():
        loser_frame = pipe.vae.encode(pixels[0, 1, 2][None]).latent_dist.mean[0]
    torch.testing.assert_close(mean[1, :, 2], loser_frame, rtol=1e-4, atol=1e-5)


def test_video_step_shares_noise_and_starts_at_ln2(tiny_video, video_data, tmp_path, monkeypatch):
    cfg = video.Config(model=str(tiny_video), data=str(video_data), output=tmp_path / "run", num_frames=FRAMES,
                       batch_size=2, max_steps=2, num_samples=1, sample_steps=2, report_to="none",
                       checkpoint_every=0, learning_rate=1e-3)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    batch = collate_pairs([video.VideoPairs(video_data, resolution=32, num_frames=FRAMES)[i] for i in (0, 1)])
    seen = []
    forward = type(pipe.unet).forward
    monkeypatch.setattr(type(pipe.unet), "forward",
                        lambda self, sample, timestep, *a, **k: (seen.append(sample)
                                                                 or forward(self, sample, timestep, *a, **k)))
    loss, stats = dpo.dpo_step(pipe.unet, batch, step_generator(0, 0, 0, "cpu"), parts)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert seen[0].shape == (4, 4, FRAMES, 16, 16) and len(seen) == 2
    monkeypatch.undo()

    video.run(cfg)
    assert (cfg.output / "samples_after.png").is_file()
    from mmalign.diffusion.models import load_lora
    from mmalign.diffusion.sample import generate

    plain = load_pipeline(tiny_video)
    plain.set_progress_bar_config(disable=True)
    before = generate(plain, ["a red circle"], steps=2, num_frames=FRAMES)
    load_lora(plain, cfg.output)
    after = generate(plain, ["a red circle"], steps=2, num_frames=FRAMES)
    assert (after - before).abs().max() > 0, "the trained LoRA loads and changes the video"


def test_the_objective_moves_the_right_way_on_a_fixed_batch(tiny_video, video_data, tmp_path):
    """With the noise draw held fixed, optimisation drives the implicit preference accuracy to 1."""
    cfg = video.Config(model=str(tiny_video), data=str(video_data), output=tmp_path / "run", num_frames=FRAMES,
                       full=True, batch_size=4, max_steps=1, num_samples=0, report_to="none", prompt_dropout=0.0,
                       beta=500)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = video.VideoPairs(video_data, resolution=32, num_frames=FRAMES)
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    optimizer = torch.optim.Adam([p for p in pipe.unet.parameters() if p.requires_grad], lr=1e-4)
    losses, accuracy = [], []
    for _ in range(15):
        loss, stats = dpo.dpo_step(pipe.unet, batch, step_generator(0, 0, 0, "cpu"), parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracy.append(stats["implicit_acc"].item())
    assert losses[-1] < 0.5 * losses[0] and accuracy[-1] == 1.0, (losses, accuracy)
