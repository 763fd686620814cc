"""Long operations move the UI's progress bar (comfy.utils.ProgressBar): Encode Subject once per reference photo."""
import pytest
import torch

from progress_helpers import recorded_progress
from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

from training import tiny  # noqa: E402

subject_mod = pack_module("nodes.subject")


@pytest.mark.parametrize("photos", [1, 3])
def test_encode_subject_ticks_once_per_reference_photo(photos):
    weights = tiny.make_tiny_weights(tiny.tiny_sdxl(0), num_queries=8)
    images = torch.rand(photos, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with recorded_progress() as ticks:
        subject = subject_mod.EncodeSubject.execute(weights, tiny.tiny_clip_vision(0), images).result[0]
    assert ticks == [(i, photos) for i in range(1, photos + 1)]
    assert subject.tokens.shape == (8 * photos, 64)


def test_no_tick_before_a_wrong_encoder_is_refused():
    weights = tiny.make_tiny_weights(tiny.tiny_sdxl(0), num_queries=8, vision_dim=48)
    with recorded_progress() as ticks, pytest.raises(ValueError, match="expect the CLIP vision encoder"):
        subject_mod.EncodeSubject.execute(weights, tiny.tiny_clip_vision(0), torch.rand(2, 64, 64, 3))
    assert ticks == []
