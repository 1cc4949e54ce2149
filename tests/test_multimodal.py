import json
import random

import numpy as np
import pytest
import torch

from nanogpt4.config import load_config
from nanogpt4.data.tokenizer import BPETokenizer
from nanogpt4.data.vision import (
    EVAL_SEED_BASE,
    Shape,
    caption,
    digit_image,
    eval_scene_items,
    load_image,
    load_vqa_jsonl,
    render_scene,
    sample_scene,
    scene_items,
    scene_questions,
    train_scene_conversation,
)
from nanogpt4.errors import UserError
from nanogpt4.model.multimodal import MultimodalTransformer
from nanogpt4.train.multimodal import (
    TextCodec,
    VQABatches,
    VQASource,
    bleu,
    question_only_prior,
    stage_cfg,
    summarise,
)

from .conftest import step_losses

IMG = 2  # <|image|> id of the BPE tokenizer


def small_cfg(**extra):
    base = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 64,
            "model.max_seq_len": 48, "multimodal.image_size": 16, "multimodal.patch_size": 8,
            "multimodal.encoder_dim": 32, "multimodal.encoder_heads": 4, "device": "cpu"}
    base.update(extra)
    return load_config("tiny", [f"{k}={v}" for k, v in base.items()])


def make_model(**extra) -> MultimodalTransformer:
    torch.manual_seed(0)
    return MultimodalTransformer(small_cfg(**extra)).eval()


def row_with_images(model, n_images=1, text=(10, 11, 12, 13)):
    ids = [7]
    for _ in range(n_images):
        ids += [5, IMG]
    ids += list(text)
    return torch.tensor([model.expand_image_tokens(ids)])


# ------------------------------------------------------------------------------------------- model
def test_image_vectors_land_exactly_on_image_slots():
    model = make_model()
    ids = row_with_images(model, n_images=2)
    images = torch.randn(2, 3, 16, 16)
    x = model.embed(ids, images)
    slots = (ids[0] == IMG).nonzero().squeeze(-1)
    assert len(slots) == 2 * model.image_tokens == 8
    feats = model.encode_images(images).reshape(-1, 32)
    torch.testing.assert_close(x[0, slots], feats)
    text = (ids[0] != IMG).nonzero().squeeze(-1)
    torch.testing.assert_close(x[0, text], model.lm.token_embed(ids[0, text]))
    # reading order: swapping the two images swaps the two slot groups
    x_swapped = model.embed(ids, images.flip(0))
    torch.testing.assert_close(x_swapped[0, slots[:4]], x[0, slots[4:]])


def test_token_merge_packs_each_block_of_patches_into_one_token():
    model = make_model(**{"multimodal.patch_size": 2, "multimodal.token_merge": 2})  # 8x8 patches -> 4x4 tokens
    assert model.image_tokens == 16 and model.projector[0].in_features == 4 * 32
    grid = torch.arange(64, dtype=torch.float32).reshape(1, 64, 1).expand(1, 64, 32)  # patch index as feature
    merged = model.merge_patches(grid)
    assert merged.shape == (1, 16, 4 * 32)
    # token (row 1, col 2) of the 4x4 grid holds patches (2,4), (2,5), (3,4), (3,5) of the 8x8 grid, in that order
    assert merged[0, 1 * 4 + 2, ::32].tolist() == [2 * 8 + 4, 2 * 8 + 5, 3 * 8 + 4, 3 * 8 + 5]
    ids = row_with_images(model, n_images=1)
    assert int((ids == IMG).sum()) == 16
    assert model(ids, torch.randn(1, 3, 16, 16)).shape[:2] == ids.shape
    with pytest.raises(UserError, match="token_merge"):
        small_cfg(**{"multimodal.token_merge": 3})


def test_changed_image_changes_answer_logits_but_not_earlier_positions():
    model = make_model()
    ids = row_with_images(model)
    first_slot = int((ids[0] == IMG).nonzero()[0])
    a = model(ids, torch.randn(1, 3, 16, 16))
    b = model(ids, torch.randn(1, 3, 16, 16))
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4
    torch.testing.assert_close(a[0, :first_slot], b[0, :first_slot])  # causal: the past cannot see the image


def test_labels_on_image_slots_are_ignored():
    model = make_model()
    ids = row_with_images(model)
    images = torch.randn(1, 3, 16, 16)
    labels = ids.roll(-1, dims=1)
    masked = labels.masked_fill(labels == IMG, -100)
    loss_raw = model(ids, images, labels=labels)
    loss_masked = model(ids, images, labels=masked)
    torch.testing.assert_close(loss_raw, loss_masked)
    # and it is the mean cross-entropy over the remaining text targets
    logits = model(ids, images)
    ref = torch.nn.functional.cross_entropy(logits[0], masked[0], ignore_index=-100)
    torch.testing.assert_close(loss_masked, ref, rtol=1e-5, atol=1e-5)


def test_cached_generation_with_image_equals_uncached():
    model = make_model()
    ids = torch.cat([row_with_images(model), row_with_images(model, text=(14, 15, 16, 17))])
    images = torch.randn(2, 3, 16, 16)
    cached = model.generate(ids, images, 12, temperature=0)
    uncached = model.generate(ids, images, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # left padding does not change a row's answer
    short = row_with_images(model, text=(10,))
    padded = torch.cat([torch.full((1, 3), 1), short], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], 1)
    a = model.generate(short, images[:1], 6, temperature=0)[:, short.size(1):]
    b = model.generate(padded, images[:1], 6, temperature=0, attention_mask=mask, pad_token_id=1)[:, padded.size(1):]
    assert torch.equal(a, b)


def test_shape_errors_are_one_line_user_errors():
    model = make_model()
    ids = row_with_images(model)
    with pytest.raises(UserError, match="does not match the model's"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match=r"image shape \(1, 16, 16\)"):
        model(ids, torch.randn(1, 1, 16, 16))
    with pytest.raises(UserError, match="4 <|image|> slots but 2 images"):
        model(ids, torch.randn(2, 3, 16, 16))
    with pytest.raises(UserError, match="no image_input"):
        model(ids)
    two = row_with_images(model, n_images=2)
    with pytest.raises(UserError, match="8 <|image|> slots but 1 images"):
        model(two, torch.randn(1, 3, 16, 16))


def test_cnn_encoder_and_five_dim_images():
    model = make_model(**{"multimodal.encoder": "cnn"})
    ids = torch.cat([row_with_images(model, n_images=2)] * 3)
    logits = model(ids, torch.randn(3, 2, 3, 16, 16))  # (B, K, C, H, W)
    assert logits.shape == (3, ids.size(1), 64)


def test_frozen_lm_stage_trains_only_encoder_and_projector():
    model = make_model(**{"multimodal.projector_lr_scale": 5.0})
    model.lm.requires_grad_(False)
    opt = model.configure_optimizers(0.1, 1e-3)
    names = {g["name"] for g in opt.param_groups}
    assert names == {"encoder", "projector"}
    assert {g["lr_scale"] for g in opt.param_groups if g["name"] == "projector"} == {5.0}
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.encoder.parameters()) + sum(
        p.numel() for p in model.projector.parameters())


def test_pretrained_vision_encoder_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_channels=3))
    vit.save_pretrained(tmp_path / "vit")
    model = make_model(**{"multimodal.pretrained_encoder": str(tmp_path / "vit")})
    assert model.image_tokens == 4  # the class token is dropped
    assert not any(p.requires_grad for p in model.encoder.parameters())
    ids = row_with_images(model)
    assert model(ids, torch.randn(1, 3, 16, 16)).shape == (1, ids.size(1), 64)
    with pytest.raises(UserError, match="cannot load vision encoder"):
        make_model(**{"multimodal.pretrained_encoder": str(tmp_path / "missing")})


def test_hub_vision_encoder_offline_uses_the_cache_only(monkeypatch):
    """Offline, a Hub name is looked up in the local cache only (no ~30 s of client retries), and a miss is
    one clear error."""
    transformers = pytest.importorskip("transformers")
    import nanogpt4.data.sources as sources

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    with pytest.raises(UserError, match="cannot load vision encoder 'org/some-vit'.*offline"):
        make_model(**{"multimodal.pretrained_encoder": "org/some-vit"})
    assert calls == [{"local_files_only": True}]


# ------------------------------------------------------------------------------------------- data
def test_scenes_are_a_function_of_their_seed_and_held_out_seeds_are_disjoint():
    a, b = scene_items(123, 32), scene_items(123, 32)
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in b]
    assert np.array_equal(a[0].image, b[0].image)
    with pytest.raises(ValueError):
        train_scene_conversation(EVAL_SEED_BASE + 1, 32, 3)
    held_out = {it.image.tobytes() for it in eval_scene_items(50, 32, 3)}
    train = {train_scene_conversation(s, 32, 3)[0].image.tobytes() for s in range(200)}
    assert not held_out & train


def test_scene_questions_match_the_scene():
    shapes = [Shape("red", "circle", 0.2, 0.7, 0.14), Shape("blue", "square", 0.75, 0.25, 0.14)]
    assert caption(shapes[::-1]) == "a red circle and a blue square"
    seen: dict[str, set] = {}
    for k in range(200):
        for kind, (q, a) in scene_questions(shapes, random.Random(k)).items():
            seen.setdefault(kind, set()).add((q, a))
    assert seen["count"] == {("how many objects are there?", "two")}
    assert ("what colour is the square?", "blue") in seen["colour"]
    assert ("what shape is the red object?", "circle") in seen["shape"]
    assert seen["spatial"] >= {("is the red circle left of the blue square?", "yes"),
                               ("is the blue square left of the red circle?", "no"),
                               ("is the blue square above the red circle?", "yes")}
    assert {a for q, a in seen["exists"]} == {"yes", "no"}
    assert ("is there a red circle?", "yes") in seen["exists"]
    assert all(not (q == "is there a red circle?" and a == "no") for q, a in seen["exists"])
    img = render_scene(shapes, 32)
    assert img.shape == (3, 32, 32) and img.min() == -1.0
    # the red object's pixels sit on the left, the blue on the right
    red = (img[0] > 0.5) & (img[2] < 0)
    assert red[:, :16].sum() > 20 and red[:, 16:].sum() == 0


def test_the_questions_ask_help_lists_are_ones_the_offline_data_asks():
    import re
    import subprocess
    import sys

    help_text = " ".join(subprocess.run([sys.executable, "-m", "nanogpt4", "ask", "--help"], capture_output=True,
                                        text=True, check=True).stdout.split())
    listed = re.findall(r"'([^']+\?)'", help_text)
    asked = {q for seed in range(3000) for q, _ in scene_questions(sample_scene(seed), random.Random(seed)).values()}
    asked |= {"what digit is this?", "is the digit even?"}  # digit_items' two questions, one per image
    assert len(listed) == 7 and set(listed) <= asked, set(listed) - asked


def test_scene_generator_keeps_objects_apart_and_distinct():
    for seed in range(300):
        shapes = sample_scene(seed)
        assert 1 <= len(shapes) <= 3
        assert len({(s.colour, s.shape) for s in shapes}) == len(shapes)


def test_digit_image_shift_and_channels():
    px = np.zeros((8, 8), dtype=np.float32)
    px[0, 0] = 1.0
    img = digit_image(px, 16, 3)
    assert img.shape == (3, 16, 16) and img[0, 0, 0] == 1.0 and img[0, 2, 2] == -1.0
    shifted = digit_image(px, 16, 1, shift=(1, 2))
    assert shifted.shape == (1, 16, 16) and shifted[0, 1, 2] == 1.0 and shifted[0, 0, 0] == -1.0


def test_user_jsonl_loader(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    f = tmp_path / "vqa.jsonl"
    f.write_text(json.dumps({"image": "red.png", "prompt": "what colour?", "answer": "red"}) + "\n")
    items = load_vqa_jsonl(f, 16, 3)
    assert items[0].image.shape == (3, 16, 16) and items[0].image[0].min() > 0.9 and items[0].kind == "custom"
    f.write_text(json.dumps({"image": "red.png", "prompt": "q", "answer": "a"}) + "\n"
                 + json.dumps({"image": "nope.png", "prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"vqa.jsonl:2: image '.*nope.png' not found"):
        load_vqa_jsonl(f, 16, 3)
    f.write_text('{"image": "red.png", "prompt": "q"}\n')
    with pytest.raises(UserError, match=r"vqa.jsonl:1: field 'answer'"):
        load_vqa_jsonl(f, 16, 3)
    f.write_text('{"image": "red.png", oops\n')
    with pytest.raises(UserError, match=r"vqa.jsonl:1"):
        load_vqa_jsonl(f, 16, 3)


def test_the_training_rows_identity_follows_what_they_are_drawn_from(tmp_path):
    from PIL import Image

    from nanogpt4.config import load_config
    from nanogpt4.train.multimodal import VQASource

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    f = tmp_path / "vqa.jsonl"
    f.write_text(json.dumps({"image": "red.png", "prompt": "what colour?", "answer": "red"}) + "\n")

    def data_id(seed=0, **mm):
        cfg = load_config("tiny", [f"multimodal.{k}={v}" for k, v in mm.items()])
        return VQASource(cfg.multimodal, 16, 3, seed).data_id

    mixed = data_id(data="scenes+digits")
    assert mixed == data_id(data="scenes+digits") != data_id(data="scenes+digits", seed=1)
    assert mixed != data_id(data="scenes+digits", digits_fraction=0.9) != data_id(data="scenes")
    assert data_id(data="scenes") == data_id(data="scenes", digits_fraction=0.9)  # a mix of one: no fraction
    rows = data_id(data=f"jsonl:{f}")
    f.write_text(json.dumps({"image": "red.png", "prompt": "what colour?", "answer": "crimson"}) + "\n")
    assert data_id(data=f"jsonl:{f}") != rows


def test_user_images_read_as_a_viewer_shows_them(tmp_path):
    from PIL import Image

    # 16-bit greyscale (scans, microscopy): Pillow's convert clips it, which made this gradient all white
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(tmp_path / "g16.png")
    g = load_image(tmp_path / "g16.png", 16, 1, "--image")
    assert g.min() < -0.9 and g.max() > 0.9 and abs(g.mean()) < 0.05
    # float images in [0, 1] spread over the 8-bit range, not rounded to 0 and 1
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    f = load_image(tmp_path / "f.tif", 8, 1, "--image")
    assert np.allclose(f, 128 / 127.5 - 1, atol=1e-6)
    # transparent pixels are background (black), whatever colour they store; the opaque red square stays red
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[8:24, 8:24] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    icon = load_image(tmp_path / "icon.png", 16, 3, "--image")
    assert (icon[:, 0, 0] == -1).all() and icon[0, 8, 8] > 0.9 and icon[1, 8, 8] < -0.9
    # a phone photo stored sideways with an EXIF orientation tag is read upright: red on the left, rotated
    # 90 degrees clockwise (orientation 6), ends up on top
    side = np.zeros((32, 64, 3), np.uint8)
    side[:, :32] = (255, 0, 0)
    side[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(side).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    photo = load_image(tmp_path / "photo.jpg", 16, 3, "--image")
    assert photo[0, 2, 8] > 0.8 and photo[2, 2, 8] < -0.8 and photo[2, 13, 8] > 0.8 and photo[0, 13, 8] < -0.8
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError, match=r"--image: cannot read image '.*broken.png'"):
        load_image(tmp_path / "broken.png", 16, 3, "--image")
    with pytest.raises(UserError, match=r"--image: '.*' is a directory, not an image; give an image file"):
        load_image(tmp_path, 16, 3, "--image")  # it said "not found"


# ------------------------------------------------------------------------------------------- training side
@pytest.fixture(scope="module")
def vqa_tok():
    texts = [f"{it.question} {it.answer}" for s in range(300) for it in scene_items(s, 16)]
    texts += ["<|user|><|image|>what colour?<|end|><|assistant|>red<|end|>"] * 20
    return BPETokenizer.train(texts + ["what digit is this? 7", "is the digit even? yes"], 400)


def test_batches_mask_everything_but_the_answer(vqa_tok):
    cfg = small_cfg(**{"model.vocab_size": vqa_tok.vocab_size, "model.max_seq_len": 64,
                       "multimodal.data": "scenes+digits"})
    model = MultimodalTransformer(cfg)
    codec = TextCodec(vqa_tok, model)
    source = VQASource(cfg.multimodal, 16, 3, seed=1)
    batches = VQABatches(source, codec, 8, 64)
    from nanogpt4.train.distributed import DistInfo

    b = batches.get(3, 0, 1, DistInfo(), "cpu")
    assert b["images"].shape == (8, 3, 16, 16)
    assert b["loss_tokens"] == int((b["labels"] != -100).sum())  # what grad accumulation weighs micro-batches by
    for r in range(8):
        conv = source.conversation(3, r)
        assert len({it.image.tobytes() for it in conv}) == 1  # one image, several questions about it
        supervised = b["labels"][r][b["labels"][r] != -100].tolist()
        expected = [t for it in conv for t in vqa_tok.encode(it.answer) + [codec.end_id]]
        assert len(supervised) > 0 and expected[:len(supervised)] == supervised  # late turns may not fit
        assert (b["input_ids"][r] == IMG).sum() == model.image_tokens  # only the first turn shows the image
        assert np.array_equal(b["images"][r].numpy(), conv[0].image)
    # a pure function of (seed, step): the same step gives the same batch
    again = batches.get(3, 0, 1, DistInfo(), "cpu")
    assert torch.equal(again["input_ids"], b["input_ids"]) and torch.equal(again["images"], b["images"])
    loss = model(b["input_ids"], b["images"], labels=b["labels"])
    assert torch.isfinite(loss)


def test_evaluation_helpers(vqa_tok):
    assert bleu("a red circle", "a red circle") == pytest.approx(1.0)
    assert bleu("a blue square", "a red circle") < 0.5
    assert bleu("a red circle and a blue square", "a red circle and a green square") > bleu("a red square",
                                                                                          "a blue circle")
    assert bleu("square", "a red circle") == 0.0
    cfg = small_cfg(**{"multimodal.data": "scenes"})
    source = VQASource(cfg.multimodal, 16, 3, seed=1)
    items = eval_scene_items(40, 16, 3)
    prior = question_only_prior(source, items, n_train=600)
    s = summarise(items, prior)
    # a blind prior answers count questions with the most common count, and never captions exactly right
    assert s["per_type"]["count"] < 0.6
    assert s["scenes_accuracy"] < 0.7
    perfect = summarise(items, [it.answer for it in items])
    assert perfect["scenes_accuracy"] == 1.0 and perfect["caption_exact_match"] == 1.0


def test_bad_data_option_is_a_user_error():
    cfg = small_cfg(**{"multimodal.data": "cats"})
    with pytest.raises(UserError, match="multimodal.data='cats'"):
        VQASource(cfg.multimodal, 16, 3, seed=1)


def test_conversation_turns_and_truncation(vqa_tok):
    cfg = small_cfg(**{"model.vocab_size": vqa_tok.vocab_size, "model.max_seq_len": 64})
    model = MultimodalTransformer(cfg)
    codec = TextCodec(vqa_tok, model)
    conv = scene_items(5, 16)
    ids, labels = codec.conversation(conv, 200)
    assert len(ids) == len(labels)
    full = ids + [labels[-1]]
    # every turn's answer (and its <|end|>) is a target, nothing else is
    answers = [t for it in conv for t in vqa_tok.encode(it.answer) + [codec.end_id]]
    assert [t for t in labels if t != -100] == answers
    assert full.count(IMG) == model.image_tokens
    assert vqa_tok.decode([t for t in full if t != IMG]).count("<|user|>") == len(conv)
    short_ids, _ = codec.conversation(conv, 30)
    assert len(short_ids) <= 30 and short_ids.count(IMG) == model.image_tokens
    with pytest.raises(UserError, match="model.max_seq_len=6"):
        codec.conversation(conv, 6)


# ------------------------------------------------------------------------------------------- end to end
MM_SMALL = ["multimodal.image_size=16", "multimodal.patch_size=8", "multimodal.encoder_dim=32",
            "multimodal.eval_scenes=8", "multimodal.batch_size=8", "multimodal.align_steps=4",
            "multimodal.tune_steps=6", "training.log_interval=2", "training.dtype=float32"]


@pytest.mark.slow
def test_multimodal_command_from_a_pretrained_run(prepared, tmp_path, capsys, monkeypatch):
    """`nanogpt4 multimodal --pretrained RUN`: align (LM frozen) then tune, evaluation, report and summary."""
    from nanogpt4.cli import main
    from nanogpt4.train.checkpoint import latest_checkpoint

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=4", "model.max_seq_len=64"]) == 0
    capsys.readouterr()
    code = main(["multimodal", "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "mm"),
                 *MM_SMALL, "--device", "cpu", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("scenes_accuracy", "digits_accuracy", "text_only_accuracy", "per_type", "caption_exact_match",
                "examples_eval", "prior_per_type", "text_only_per_type"):
        assert summary[key] is not None, key
    assert set(summary["per_type"]) == {"colour", "shape", "count", "spatial", "exists", "caption", "digit", "even"}
    assert summary["examples_eval"] > 360  # every held-out digit twice, plus the scenes
    out = tmp_path / "mm"
    assert (out / "report.md").exists() and (out / "plots" / "examples.png").exists()
    assert (out / "align" / "metrics.jsonl").exists() and (out / "tune" / "metrics.jsonl").exists()
    # the align stage kept the language model frozen: its LM weights equal the pretrained ones
    from safetensors.torch import load_file

    pre = load_file(str(latest_checkpoint(tmp_path / "pre") / "model.safetensors"))
    aligned = load_file(str(latest_checkpoint(out / "align") / "model.safetensors"))
    tuned = load_file(str(latest_checkpoint(out / "tune") / "model.safetensors"))
    assert all(torch.equal(aligned[f"lm.{k}"], v) for k, v in pre.items())
    assert not torch.equal(tuned["lm.token_embed.weight"], pre["token_embed.weight"])
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {"question", "answer", "model", "blank_image"} <= rows[0].keys()
    # under a deadline, the tune stage's stop is predicted from the align stage's timed probe evaluation
    import time

    from nanogpt4.train import multimodal

    seen = []
    monkeypatch.setattr(multimodal, "predicted_evaluation_s", lambda probe_s, *a: seen.append(list(probe_s)) or 0.0)
    cfg = load_config("tiny", [*MM_SMALL, "device=cpu"])
    multimodal.run_multimodal(cfg, tmp_path / "pre", tmp_path / "mm2", log=lambda _m: None, progress=False,
                              deadline=time.time() + 600, evaluation_s=5.0)
    assert len(seen) == 2 and seen[0] == [] and len(seen[1]) >= 1 and all(t > 0 for t in seen[1])

    # `nanogpt4 ask`: a user's image file through the trained model, the same greedy answer as the API gives
    from PIL import Image

    from nanogpt4.data.vision import eval_scene_items, load_image
    from nanogpt4.train.multimodal import greedy_answers, load_multimodal

    item = eval_scene_items(1, 16, 3)[0]
    png = tmp_path / "scene.png"
    Image.fromarray(np.rint((item.image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(png)
    assert np.array_equal(load_image(png, 16, 3, "test"), item.image)  # a saved scene reads back exactly
    capsys.readouterr()
    assert main(["ask", "--run", str(out), "--image", str(png), "--question", item.question, "--json"]) == 0
    asked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, codec = load_multimodal(out, "cpu")
    assert asked["answer"] == greedy_answers(model, codec, [item.question], item.image[None], 24)[0]
    assert main(["ask", "--run", str(tmp_path / "pre"), "--image", str(png)]) == 2
    assert "text-only model" in capsys.readouterr().err
    monkeypatch.setattr(multimodal, "greedy_answers", lambda *a: [""])  # an answer ended at once: not a blank line
    assert main(["ask", "--run", str(out), "--image", str(png)]) == 0
    assert "the answer is empty" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["ask", "--run", str(out), "--image", str(tmp_path / "none.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["ask", "--run", str(out), "--image", str(png), "--question", "why? " * 60]) == 2
    assert "shorten the question" in capsys.readouterr().err
    for run in (out, out / "tune"):  # the run, or one stage of it: sampling or exporting it names `ask`
        assert main(["sample", "--run", str(run)]) == 2 and "nanogpt4 ask" in capsys.readouterr().err
        assert main(["export-hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
        assert "nanogpt4 ask" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_your_own_rows_are_reported_with_their_controls(tmp_path, capsys):
    """On `multimodal.data=jsonl:` rows the blank-image control and the question-only prior read None (they
    were taken from the scenes and digits only) and the command printed "scenes None, digits None"."""
    from PIL import Image

    from nanogpt4.cli import main

    rows = []
    for i in range(40):
        colour = ("red", "green")[i // 10 % 2]  # held out: rows 0, 10, 20, 30
        Image.new("RGB", (24, 24), (255, 0, 0) if colour == "red" else (0, 255, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "prompt": "what colour is it?", "answer": colour}))
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "mm"
    assert main(["multimodal", "--out", str(out), f"multimodal.data=jsonl:{tmp_path / 'rows.jsonl'}", *MM_SMALL]) == 0
    said = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenes_accuracy"] is None and summary["digits_accuracy"] is None
    for key in ("custom_accuracy", "text_only_accuracy", "prior_accuracy"):
        assert 0 <= summary[key] <= 1, key
    assert summary["prior_accuracy"] == 0.5  # 2 held-out rows of each colour: the prior answers one colour
    assert (f"multimodal: accuracy your data {summary['custom_accuracy']:.3f}, blank-image control "
            f"{summary['text_only_accuracy']:.3f}; report") in said  # no "scenes None", no 16-digit floats
    report = (out / "report.md").read_text()
    assert "your data's accuracy" in report and "scenes accuracy" not in report
    assert "warning" not in said
    # one row trains and is the evaluation too: its accuracy is no held-out one, which the run says
    (tmp_path / "one.jsonl").write_text(rows[0] + "\n")
    assert main(["multimodal", "--out", str(tmp_path / "one"), f"multimodal.data=jsonl:{tmp_path / 'one.jsonl'}",
                 *MM_SMALL, "multimodal.align_steps=1", "multimodal.tune_steps=1"]) == 0
    assert "one.jsonl has one row, which trains and is evaluated on" in capsys.readouterr().out


def test_multimodal_command_bad_input(tmp_path, capsys):
    from nanogpt4.cli import main

    assert main(["multimodal", "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    f = tmp_path / "rows.jsonl"
    f.write_text('{"image": "missing.png", "prompt": "q", "answer": "a"}\n')
    assert main(["multimodal", "--out", str(tmp_path / "y"), f"multimodal.data=jsonl:{f}", *MM_SMALL]) == 2
    assert "rows.jsonl:1: image" in capsys.readouterr().err
    assert main(["multimodal", "--out", str(tmp_path / "z"), "multimodal.patch_size=5"]) == 2
    assert "multiple of patch_size" in capsys.readouterr().err
    # a question that cannot fit beside its image: it stopped the first training step that drew it, the run
    # directory already made; now refused before anything is written
    assert main(["multimodal", "--out", str(tmp_path / "long"), *MM_SMALL, "multimodal.patch_size=4",
                 "model.max_seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert "with its answer and the 16 image tokens needs" in err and "more than the language model's context " \
        "(32): use fewer image tokens (a larger multimodal.patch_size or multimodal.token_merge=2), or raise " \
        "model.max_seq_len" in err, err
    assert not (tmp_path / "long").exists()


MM_RESUME = [*MM_SMALL, "multimodal.tune_steps=8", "training.log_interval=1", "model.dim=32", "model.n_layers=2",
             "model.n_heads=4", "model.vocab_size=512", "model.max_seq_len=64", "--device", "cpu"]


def _sigterm_during(monkeypatch, stage_steps: dict[str, int]) -> None:
    """A scheduler's SIGTERM while the batch of ``stage_steps[stage]``'s next step is read (once per stage)."""
    import os
    import signal

    from nanogpt4.train import multimodal

    real_get, real_trainer = multimodal.VQABatches.get, multimodal.Trainer
    stage = {}

    class Trainer(real_trainer):  # which stage the batches are read for: the trainer's run directory's name
        def fit(self):
            stage["name"] = self.run_dir.name
            return super().fit()

    def get(self, step, *args):
        if stage_steps.get(stage["name"]) == step:
            del stage_steps[stage["name"]]
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get(self, step, *args)

    monkeypatch.setattr(multimodal, "Trainer", Trainer)
    monkeypatch.setattr(multimodal.VQABatches, "get", get)


def _same_run(a, b, stages=("tune",)) -> None:
    from safetensors.torch import load_file

    from nanogpt4.train.checkpoint import latest_checkpoint

    for name in stages:
        assert step_losses(a / name) == step_losses(b / name), name  # exact float equality, every step
        wa, wb = (load_file(str(latest_checkpoint(r / name) / "model.safetensors")) for r in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert json.loads((a / "summary.json").read_text())["scenes_accuracy"] == \
        json.loads((b / "summary.json").read_text())["scenes_accuracy"]


def test_a_stopped_multimodal_run_resumes_exactly(tmp_path, capsys, monkeypatch):
    """SIGTERM at step 3 of 8: the stage checkpoints where it stopped and `nanogpt4 multimodal --resume` goes on
    from there to the uninterrupted run's per-step losses and weights, bit for bit (fp32, CPU)."""
    from nanogpt4.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["multimodal", "--out", str(full), *MM_RESUME]) == 0
    _sigterm_during(monkeypatch, {"tune": 2})
    assert main(["multimodal", "--out", str(part), *MM_RESUME]) == 143
    err = capsys.readouterr().err
    assert err.strip().endswith(f"stopped: SIGTERM at step 3 of 8; {part / 'tune' / 'checkpoints' / 'step_3'} is "
                                f"kept, a partly trained model; continue with: nanogpt4 multimodal --out {part} "
                                f"--resume"), err
    assert not (part / "summary.json").exists()
    assert main(["multimodal", "--out", str(part), "--resume", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "resumed from" in said and "warning" not in said
    _same_run(full, part)
    # nothing left to train: refused, unchanged; more steps go on from the last, on other rows with a warning
    assert main(["multimodal", "--out", str(part), "--resume"]) == 2
    assert "has finished; give a larger multimodal.tune_steps (now 8)" in capsys.readouterr().err
    assert main(["multimodal", "--out", str(part), "--resume", "multimodal.tune_steps=10",
                 "multimodal.digits_fraction=0.9", "--device", "cpu"]) == 0
    assert "warning: the training data is not what step 8 was trained on" in capsys.readouterr().out
    assert list(step_losses(part / "tune")) == list(range(1, 11))


def test_multimodal_resume_refusals(tmp_path, capsys, monkeypatch):
    """Each a one-line error that changes nothing; a run stopped before its first checkpoint cannot resume."""
    from nanogpt4.cli import main

    assert main(["multimodal", "--resume"]) == 2
    assert "--resume needs --out RUN_DIR" in capsys.readouterr().err
    assert main(["multimodal", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume: '" in capsys.readouterr().err
    _sigterm_during(monkeypatch, {"tune": 2})
    run = tmp_path / "run"
    assert main(["multimodal", "--out", str(run), *MM_RESUME, "multimodal.tune_steps=60"]) == 143
    assert "step_3 is kept" in capsys.readouterr().err
    (run / "tune" / "checkpoints" / "step_3").rename(run / "tune" / "checkpoints" / "gone")  # as if none was written
    assert main(["multimodal", "--out", str(run), "--resume"]) == 2
    assert "nothing to resume: '" + str(run) + "' was stopped before its first checkpoint" in capsys.readouterr().err
    (run / "tune" / "checkpoints" / "gone").rename(run / "tune" / "checkpoints" / "step_3")
    before = (run / "config.yaml").read_text()
    for bad, said in [(["--pretrained", str(run)], "did not start from --pretrained '" + str(run) + "' (it started "
                       "from a new language model); --resume continues its own weights: drop --pretrained"),
                      (["model.dim=64"], "cannot change model.* when resuming"),
                      (["multimodal.tune_steps=2"], "is at step 3, past multimodal.tune_steps=2")]:
        assert main(["multimodal", "--out", str(run), "--resume", *bad]) == 2
        assert said in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before


def test_the_pipeline_resumes_its_stopped_multimodal_stage(tmp_path, monkeypatch):
    """Rerun, the pipeline continues the stage from its checkpoint under its deadline; the time the stage had
    trained before (planted as 1000 s) does not count against this command's time left (it stopped at once)."""
    import time

    from nanogpt4.errors import TrainingStopped
    from nanogpt4.pipeline import _multimodal_stage
    from nanogpt4.train.checkpoint import latest_checkpoint, load_trainer_state
    from nanogpt4.train.multimodal import run_multimodal

    cfg = load_config("tiny", [o for o in MM_RESUME if "=" in o] + ["device=cpu"])
    quiet = {"log": lambda _m: None, "progress": False}
    full, part = tmp_path / "full", tmp_path / "part"
    run_multimodal(cfg, None, full, **quiet)
    _sigterm_during(monkeypatch, {"tune": 2})
    with pytest.raises(TrainingStopped):
        run_multimodal(cfg, None, part, **quiet)
    ckpt = latest_checkpoint(part / "tune")
    torch.save({**load_trainer_state(ckpt), "train_time_s": 1000.0}, ckpt / "trainer_state.pt")
    said = []
    summary = _multimodal_stage(cfg, tmp_path / "unread", part, False, said.append, time.time() + 600, 0.0)
    assert said[0] == f"multimodal: resuming interrupted run {part}"
    assert summary["tune_steps"] == 8 and (part / "summary.json").exists()
    _same_run(full, part)


@pytest.mark.slow
def test_a_multimodal_run_stopped_after_its_align_stage_resumes_exactly(prepared, tmp_path, capsys, monkeypatch):
    """From a pretrained LM: stopped in the align stage, then in the tune stage (the finished align stage reused),
    resumed twice, it is the uninterrupted run."""
    from nanogpt4.cli import main

    ov, _ = prepared
    assert main(["pretrain", "--out", str(tmp_path / "pre"), *ov, "training.max_steps=4", "model.max_seq_len=64"]) == 0
    mm = [a for a in MM_RESUME if not a.startswith("model.")]
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["multimodal", "--pretrained", str(tmp_path / "pre"), *mm]
    assert main([*args, "--out", str(full)]) == 0
    _sigterm_during(monkeypatch, {"align": 1, "tune": 4})
    assert main([*args, "--out", str(part)]) == 143
    capsys.readouterr()
    assert main(["multimodal", "--out", str(part), "--resume", "--pretrained", str(tmp_path)]) == 2
    assert f"(it started from {tmp_path / 'pre'})" in capsys.readouterr().err
    assert main([*args, "--out", str(part), "--resume"]) == 143  # the command it began with, plus --resume
    # as if killed before the tune stage's first checkpoint: that stage starts again, its log with it
    import shutil

    shutil.rmtree(part / "tune" / "checkpoints")
    capsys.readouterr()
    assert main(["multimodal", "--out", str(part), "--resume", "--device", "cpu"]) == 0
    assert f"{part / 'tune'} starts again (it was stopped before its first checkpoint)" in capsys.readouterr().out
    _same_run(full, part, ("align", "tune"))
    assert [(part / name / "metrics.jsonl").read_text().count("step_loss") for name in ("align", "tune")] == [4, 8]
    assert json.loads((part / "summary.json").read_text())["lm_pretrained"] == str(tmp_path / "pre")

    # a stage the next has begun after is done, even given more steps now (as a stage a time budget cut short):
    # trained on, its steps would be lost when the next stage's checkpoint loads
    _sigterm_during(monkeypatch, {"tune": 2})
    assert main([*args, "--out", str(tmp_path / "short")]) == 143
    assert main(["multimodal", "--out", str(tmp_path / "short"), "--resume", "--device", "cpu",
                 "multimodal.align_steps=6"]) == 0
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["align_steps"] == 4 and summary["align_train_loss"] == step_losses(full / "align")[4]
    _same_run(full, tmp_path / "short")


def test_training_conversations_teach_vertical_order():
    found = 0
    for seed in range(60):
        shapes = sample_scene(seed)
        conv = train_scene_conversation(seed, 16, 3)
        vertical = [it for it in conv if it.kind == "caption_vertical"]
        if len(shapes) > 1:
            assert vertical and vertical[0].answer == caption(shapes, key=lambda s: s.y)
            found += 1
        for it in conv:
            if it.kind == "spatial" and " above " in it.question:
                a, b = it.question[len("is the "):-1].split(" above the ")
                ya = next(s.y for s in shapes if s.name == a)
                yb = next(s.y for s in shapes if s.name == b)
                assert it.answer == ("yes" if ya < yb else "no")
    assert found > 20


def test_a_deadline_stops_training_and_keeps_the_evaluation(tmp_path):
    """A time-budgeted pipeline's last stage: past its deadline it trains one step, says so, and still
    evaluates everything."""
    import time

    from nanogpt4.train.multimodal import run_multimodal

    cfg = small_cfg(**dict(o.split("=") for o in MM_SMALL), **{"multimodal.data": "scenes", "model.vocab_size": 512,
                                                           "model.max_seq_len": 64})
    said = []
    summary = run_multimodal(cfg, None, tmp_path / "mm", log=said.append, progress=False, deadline=time.time() - 1)
    assert summary["tune_steps"] == 1 and "align_steps" not in summary  # no pretrained LM: no align stage
    assert any("stopped at step 1 of 6: the time budget is spent" in line for line in said)
    assert summary["scenes_accuracy"] is not None and summary["examples_eval"] > 0
    assert (tmp_path / "mm" / "summary.json").exists()


def test_training_stops_before_the_deadline_by_the_evaluations_time(tmp_path):
    """The deadline is the stage's end, its evaluation included: with the evaluation predicted to take longer
    than the time left, training stops at once; with none predicted, the same deadline lets every step run."""
    import time

    from nanogpt4.train.multimodal import predicted_evaluation_s, run_multimodal

    cfg = small_cfg(**dict(o.split("=") for o in MM_SMALL), **{"multimodal.data": "scenes", "model.vocab_size": 512,
                                                           "model.max_seq_len": 64})
    said = []
    run = run_multimodal(cfg, None, tmp_path / "slow", log=said.append, progress=False,
                         deadline=time.time() + 600, evaluation_s=1e6)
    assert run["tune_steps"] == 1 and any("the time budget is spent" in line for line in said)
    run = run_multimodal(cfg, None, tmp_path / "fast", log=lambda _m: None, progress=False,
                         deadline=time.time() + 600, evaluation_s=0.0)
    assert run["tune_steps"] == 6
    # once the stage has timed a probe evaluation, its rate predicts the held-out one (every question twice)
    assert predicted_evaluation_s([], 256, 2350, 11.6) == 11.6
    assert predicted_evaluation_s([1.5, 1.2], 256, 2350, 11.6) == pytest.approx(1.2 * 2 * 2350 / 256)


def test_stage_probe_evaluations_are_at_most_four_and_not_more_often_than_every_25_steps():
    cfg = load_config("tiny")
    # the full recipe's stages keep four; a shortened one evaluates at its end only
    assert [stage_cfg(cfg, n).eval_interval for n in (3500, 308, 100, 40, 9)] == [875, 77, 25, 25, 9]
    assert stage_cfg(cfg, 9).max_time_s is None and stage_cfg(cfg, 9, 12.5).max_time_s == 12.5


def test_a_shortened_tune_stage_follows_the_full_runs_curve_and_anneals_at_its_end():
    from nanogpt4.plan import scaled
    from nanogpt4.train.trainer import lr_for

    cfg = load_config("tiny")
    short = scaled(cfg, 0.074)
    assert (short.multimodal.tune_steps, short.multimodal.lr_decay_steps, short.multimodal.cooldown_steps) == (
        259, 3500, 78)
    t, full = stage_cfg(short, 259, tune=True), stage_cfg(cfg, 3500, tune=True)
    assert (t.warmup_steps, t.lr_decay_steps, t.cooldown_steps) == (100, 3500, 78)

    def lrs(c, n):
        return [lr_for(c, s) for s in range(n)]

    assert lrs(t, 181) == lrs(full, 181)  # the full run's curve until the cooldown ...
    assert lrs(t, 259)[-1] == pytest.approx(t.learning_rate * t.min_lr_ratio)  # ... then down to the floor
    # the full recipe, the align stage and a stage without a shortened schedule keep their own cosine
    assert scaled(cfg, 1.0) == cfg and (full.warmup_steps, full.cooldown_steps) == (100, 0)
    align = stage_cfg(short, 7)
    assert (align.warmup_steps, align.lr_decay_steps, align.cooldown_steps) == (1, 7, 0)


def test_the_tune_stage_trains_on_its_schedule(tmp_path):
    from nanogpt4.train.multimodal import run_multimodal
    from nanogpt4.utils import read_jsonl

    settings = dict(o.split("=") for o in MM_SMALL) | {
        "multimodal.data": "scenes", "model.vocab_size": 512, "model.max_seq_len": 64,
        "multimodal.lr_decay_steps": 600, "multimodal.cooldown_steps": 2, "training.log_interval": 1}
    cfg = small_cfg(**settings)
    said = []
    run_multimodal(cfg, None, tmp_path / "mm", log=said.append, progress=False)
    lr = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "mm" / "tune" / "metrics.jsonl") if "lr" in r}
    peak = cfg.multimodal.learning_rate
    assert lr[1] == pytest.approx(peak / 61)  # warming up over 61 steps, as a 600-step stage would
    assert lr[4] == pytest.approx(peak * 4 / 61) and lr[6] == pytest.approx(peak * cfg.training.min_lr_ratio)
    # the warning names what sets this warmup: training.warmup_steps, which it named, has no say in it
    warned = [m for m in said if "is longer than the run" in m]
    assert len(warned) == 1 and "training.warmup_steps" not in warned[0], said
    assert warned[0].endswith("here multimodal.lr_decay_steps=600: give more steps or a shorter "
                              "multimodal.lr_decay_steps (a pipeline's --scale keeps the full run's)")


@pytest.mark.parametrize("bad, said", [("multimodal.cooldown_steps=-1", "multimodal.cooldown_steps must be in"),
                                       ("multimodal.cooldown_steps=5000", "multimodal.cooldown_steps must be in"),
                                       ("multimodal.lr_decay_steps=0", "multimodal.lr_decay_steps must be positive")])
def test_bad_tune_schedule_settings_are_refused(bad, said):
    with pytest.raises(UserError, match=said):
        load_config("tiny", [bad])
