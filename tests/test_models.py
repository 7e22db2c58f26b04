"""Model loading through the one function users call: checkpoint files, tags, hub ids, toy configs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from saferclip_data.models.clip import known_architectures, load_clip, model_config, weight_source_kind
from saferclip_data.pipeline.errors import UserError

from conftest import recipe_dict, write_recipe
from helpers import write_image_manifest


def test_weight_source_kinds():
    assert weight_source_kind("ViT-B-32", None) == "random"
    assert weight_source_kind("ViT-B-32", "openai") == "tag"
    assert weight_source_kind("ViT-B-32", "/ckpt/model.pt") == "file"
    assert weight_source_kind("ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32") == "hub"
    assert weight_source_kind("hf-hub:laion/CLIP-ViT-B-32", None) == "hub"
    assert weight_source_kind("local-dir:/models/clip", None) == "local-dir"
    assert "toy-vit-tiny" in known_architectures() and "ViT-L-14" in known_architectures()


def test_architectures_read_from_config_files_are_open_clips_own_list():
    """The recipe check reads the config files instead of importing open_clip: the two lists must agree."""
    import open_clip

    from saferclip_data.models.clip import register_toy_configs

    fast = known_architectures()
    register_toy_configs()
    assert fast == sorted(open_clip.list_models()) and len(fast) > 100
    assert all(model_config(arch) == open_clip.get_model_config(arch) for arch in fast)
    assert model_config("no-such-arch") == {}


@pytest.mark.slow
def test_random_init_vit_b32_checkpoint_loads_through_load_clip(tmp_path, cli):
    """A real architecture at random init, saved and reloaded the way a user's checkpoint would be."""
    reference = load_clip("ViT-B-32", None, init_seed=3)
    ckpt = tmp_path / "vit-b-32-random.pt"
    torch.save({"state_dict": reference.model.state_dict()}, ckpt)
    other_seed = load_clip("ViT-B-32", None, init_seed=4)
    assert other_seed.identity != reference.identity
    del other_seed
    loaded = load_clip("ViT-B-32", str(ckpt))
    assert loaded.identity == reference.identity and loaded.embed_dim == 512 and loaded.image_size == 224
    del reference, loaded

    manifest = write_image_manifest(tmp_path / "m", 6)
    data = recipe_dict(manifest, batch_size=6)
    data["model"] = {"arch": "ViT-B-32", "pretrained": "vit-b-32-random.pt"}  # relative to the recipe
    recipe = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = cli("build", str(recipe), "-w", str(tmp_path / "w"), "--executor", "local", "--no-progress")
    assert code == 0, err
    table = pq.read_table(tmp_path / "w" / "embed" / "part-00000.parquet")
    assert table.num_rows == 6 and table.schema.field("image_embedding").type.list_size == 512
    identity = table.schema.metadata[b"model_identity"].decode()
    assert identity.startswith("ViT-B-32@sha256:")


def test_tags_and_hub_ids_fail_offline_with_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"model: cannot load toy-vit-tiny with weights .*broken\.pt \(file\)"):
        bad = tmp_path / "broken.pt"
        bad.write_bytes(b"not a checkpoint")
        load_clip("toy-vit-tiny", str(bad))
    with pytest.raises(UserError, match=r"cannot load hf-hub:example-org/clip-none \(hub\)"):
        load_clip("hf-hub:example-org/clip-none", None, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"cannot load RN50 with weights openai \(tag\)"):
        load_clip("RN50", "openai", cache_dir=str(tmp_path))


@pytest.mark.parametrize("arch", ["toy-vit-tiny", "ViT-B-32"])
def test_trimmed_captions_give_the_full_width_features(arch):
    """The text tower run over only the columns the captions use: same features, narrower tokens."""
    from saferclip_data.models.clip import encode_text, text_trim

    clip = load_clip(arch, None, init_seed=1)
    captions = ["a cat", "two dogs running on the grassy field next to a big red barn at noon", ""]
    tokens = clip.tokenizer(captions)
    trim = text_trim(clip.model)
    assert trim is not None
    narrow = trim(tokens)
    longest = int((tokens != 0).sum(1).max())  # start and end tokens included
    assert narrow.shape == (3, longest) and longest < tokens.shape[1]
    with torch.no_grad():
        full, cut = clip.model.encode_text(tokens), encode_text(clip.model, narrow)
    assert torch.allclose(full, cut, atol=1e-5), float((full - cut).abs().max())
    assert cut.abs().max() > 1e-2  # real features, not zeros

    pair = trim(tokens[:1], tokens[1:2])  # several batches share the widest one's width
    assert pair[0].shape[1] == pair[1].shape[1] == int((tokens[1] != 0).sum())


def test_models_that_need_their_full_context_are_never_trimmed():
    """Without the causal mask the padding is seen by every position: no trimming, and narrow tokens are refused
    with a clear error rather than silently giving other features."""
    from saferclip_data.models.clip import encode_text, text_trim, trim_tokens

    clip = load_clip("toy-vit-tiny", None)
    clip.model.attn_mask = None
    tokens = clip.tokenizer(["a cat"])
    assert text_trim(clip.model) is None and trim_tokens(clip.model, tokens) is tokens
    with pytest.raises(ValueError, match="full context"):
        encode_text(clip.model, tokens[:, :4])
