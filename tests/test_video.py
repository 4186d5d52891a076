"""Video Diffusion-DPO: frame folders and video files, frame-count errors, per-frame (UNet3D) and causal (Wan)
encoding, the shared-noise step on tiny text-to-video models, and the objective moving the right way."""

import json
import math

import pytest
import torch

from mmalign.data import DataError
from mmalign.diffusion import base, dpo, latents, pairwise, video
from mmalign.diffusion.data import collate_pairs
from mmalign.diffusion.models import denoiser_of, load_pipeline
from mmalign.diffusion.world import render
from mmalign.errors import BadRow
from mmalign.trainer import Trainer, step_generator

FRAMES = 3
# per family: frames per training video, and the latents [C, F', h, w] of one at 32 pixels (Wan: 1 + (5-1)/4 frames)
VIDEO_FAMILIES = {"video": (FRAMES, (4, FRAMES, 16, 16)), "wan": (5, (4, 2, 8, 8))}


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
def clips(tmp_path_factory):
    """`clips(frames)`: four pairs of `frames`-frame videos (the first a GIF) in pairs.jsonl, written once."""
    written = {}

    def data(frames):
        if frames not in written:
            root = tmp_path_factory.mktemp(f"videos{frames}")
            rows = []
            for i in range(4):
                left = write_clip(root / f"left{i}", 10 - i, -1, as_gif=i == 0, frames=frames)
                right = write_clip(root / f"right{i}", 20 + i, 1, frames=frames)
                rows.append({"caption": "a red circle", "video_0": left, "video_1": right, "label_0": 1})
            written[frames] = root / "pairs.jsonl"
            written[frames].write_text("".join(json.dumps(r) + "\n" for r in rows))
        return written[frames]
    return data


@pytest.fixture(scope="module")
def video_data(clips):
    return clips(FRAMES)


@pytest.fixture(scope="module")
def tiny_video(tiny_family):
    return tiny_family("video")


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
    pairs = video.VideoPairs(bad, resolution=32, num_frames=FRAMES)  # videos are read when their row is loaded
    for row, field, reason in [(2, "video_1", "has 2 frames, expected 3"), (3, "video_0", "missing does not exist"),
                               (1, "video_1", "short/000.png is one image, not a video")]:
        with pytest.raises(BadRow, match=f"bad.jsonl: record {row}, field '{field}': cannot be read \\(.*{reason}"):
            pairs[row]


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


def test_wan_latents_are_normalised_and_decoded_as_wan_pipeline_does(tiny_family, clips):
    """Wan's causal VAE encodes 5 frames whole into 2 latent frames; from_latents(x0) is WanPipeline's own decode of
    x0 (`latents / latents_std + latents_mean`) and the inverse of to_latents (decode of the posterior mean)."""
    pipe = load_pipeline(tiny_family("wan"))
    pipe.set_progress_bar_config(disable=True)
    pixels = collate_pairs([video.VideoPairs(clips(5), resolution=32, num_frames=5)[0]])["pixel_values"]
    mean, std = pairwise.encode_pairs(pipe.vae, pixels, torch.float32)
    assert mean.shape == (2, 4, 2, 8, 8)
    x0 = latents.to_latents(mean, torch.zeros_like(std), torch.Generator(), pipe.vae)
    channel_std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(x0 * channel_std + torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1),
                               mean)
    ours = latents.from_latents(x0, pipe.vae)
    # the pipeline decodes whatever its last step leaves: x0, set by the step callback
    theirs = pipe(prompt=["a red circle"] * 2, num_inference_steps=1, height=32, width=32, num_frames=5,
                  output_type="pt", callback_on_step_end=lambda *_: {"latents": x0}).frames
    with torch.no_grad():
        decoded = (pipe.vae.decode(mean).sample / 2 + 0.5).clamp(0, 1).transpose(1, 2)
    assert ours.shape == theirs.shape == (2, 5, 3, 32, 32)
    gaps = {"pipeline": (ours - theirs).abs().max().item(), "decode": (ours - decoded).abs().max().item()}
    assert max(gaps.values()) <= 1e-5, gaps


@pytest.mark.parametrize("kind", VIDEO_FAMILIES)
def test_video_step_shares_noise_and_starts_at_ln2(tiny_family, clips, kind, tmp_path, monkeypatch):
    frames, latent_shape = VIDEO_FAMILIES[kind]
    model, data = tiny_family(kind), clips(frames)
    cfg = video.Config(model=str(model), data=str(data), output=tmp_path / "run", num_frames=frames, resolution=32,
                       batch_size=2, max_steps=3, num_samples=1, sample_steps=2, report_to="none",
                       checkpoint_every=0, learning_rate=1e-3)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    batch = collate_pairs([video.VideoPairs(data, resolution=32, num_frames=frames)[i] for i in (0, 1)])
    denoiser, seen = denoiser_of(pipe), []
    forward = type(denoiser).forward
    monkeypatch.setattr(type(denoiser), "forward",
                        lambda self, *a, **k: seen.append(k) or forward(self, *a, **k))
    loss, stats = dpo.dpo_step(denoiser, batch, step_generator(0, 0, 0, "cpu"), parts)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert len(seen) == 2
    noisy = seen[0].get("sample", seen[0].get("hidden_states"))
    assert noisy.shape == (4, *latent_shape)
    monkeypatch.undo()

    history = video.run(cfg)
    assert len(history) == 3 and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (cfg.output / "samples_after.png").is_file()
    from mmalign.diffusion.models import load_lora
    from mmalign.diffusion.sample import generate

    plain = load_pipeline(model)
    plain.set_progress_bar_config(disable=True)
    before = generate(plain, ["a red circle"], steps=2, num_frames=frames, height=32, width=32)
    load_lora(plain, cfg.output)  # Wan: a diffusers LoRA file, so this is WanPipeline.load_lora_weights
    after = generate(plain, ["a red circle"], steps=2, num_frames=frames, height=32, width=32)
    assert (after - before).abs().max() > 0, "the trained LoRA loads and changes the video"


@pytest.mark.parametrize("kind", VIDEO_FAMILIES)
def test_the_objective_moves_the_right_way_on_a_fixed_batch(tiny_family, clips, kind, tmp_path):
    """With the noise draw held fixed, optimisation drives the implicit preference accuracy to 1."""
    frames = VIDEO_FAMILIES[kind][0]
    cfg = video.Config(model=str(tiny_family(kind)), data=str(clips(frames)), output=tmp_path / "run",
                       num_frames=frames, resolution=32, full=True, batch_size=4, max_steps=1, num_samples=0,
                       report_to="none",
                       prompt_dropout=0.0, beta=500)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = video.VideoPairs(cfg.data, resolution=32, num_frames=frames)
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    denoiser = denoiser_of(pipe)
    optimizer = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    losses, accuracy = [], []
    for _ in range(15):
        loss, stats = dpo.dpo_step(denoiser, batch, step_generator(0, 0, 0, "cpu"), parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracy.append(stats["implicit_acc"].item())
    assert losses[-1] < 0.5 * losses[0] and accuracy[-1] == 1.0, (losses, accuracy)
