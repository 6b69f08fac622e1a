"""Feature-similarity CC with a tiny real Dinov2Model loaded through AutoModel."""

from __future__ import annotations

import pytest
import torch

from mtflow.reward.feature_cc import FeatureSimilarityCC, similarity_to_score
from mtflow.reward.judge import VLMJudge

from .conftest import make_items
from .test_judge import ScriptedBackend


def reference_embedding(path, image) -> torch.Tensor:
    """Pooled DINOv2 embedding of one image, computed alone in float64."""
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(path).double().eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels.double()).pooler_output[0]


def test_similarity_to_score():
    assert similarity_to_score(torch.tensor([1.0, 0.5, 0.0, -0.3])).tolist() == [5.0, 3.0, 1.0, 1.0]


@pytest.mark.parametrize("reference", ["source", "previous"])
def test_scores_equal_cosine_computed_by_hand(tiny_dinov2_path, reference):
    items = make_items(2, num_turns=2, seed=21)
    scorer = FeatureSimilarityCC(str(tiny_dinov2_path), reference=reference, batch_size=4)
    result = scorer.score_turns(items)
    assert result.scores.shape == (2, 2)
    item = items[1]
    turn = 1  # second turn
    ref_image = item.source if reference == "source" else item.outputs[0]
    a = reference_embedding(tiny_dinov2_path, ref_image)
    b = reference_embedding(tiny_dinov2_path, item.outputs[turn])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert result.scores[1, turn].item() == pytest.approx(1 + 4 * max(0.0, cosine.item()), abs=1e-4)
    assert result.diagnostics[1]["cosine"][turn] == pytest.approx(cosine.item(), abs=1e-5)


def test_unchanged_image_scores_5_and_plugs_into_the_judge(tiny_dinov2_path):
    items = make_items(2, num_turns=2, seed=22)
    items[0].outputs[0] = items[0].source.copy()  # turn 1 of item 0 left the image untouched
    cc = FeatureSimilarityCC(str(tiny_dinov2_path))
    backend = ScriptedBackend({("if", None): "<Turn1Score>3</Turn1Score><Turn2Score>4</Turn2Score>"})
    batch = VLMJudge(backend, mode="thinking", cc_scorer=cc).score(items)
    assert batch.content_consistency[0, 0].item() == pytest.approx(5.0, abs=1e-5)
    assert batch.content_consistency[1].lt(5.0).all()  # different random images are not identical
    assert batch.scored.all()
    assert batch.instruction_following.tolist() == [[3.0, 4.0], [3.0, 4.0]]
    assert VLMJudge(backend, cc_scorer=cc).describe()["cc"]["scorer"] == "FeatureSimilarityCC"
