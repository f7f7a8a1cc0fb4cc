"""The attention processor against explicit attention, and layer placement."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from p2p_widgets.processors import LayerPlace, P2PAttnProcessor, find_places


class Handler:
    """A controller stand-in that injects one row's queries and keys into another."""

    records_self = False

    def __init__(self, sources=None, first=0):
        self.sources = sources
        self.first = first
        self.seen = None

    def explicit_rows(self, place):
        return self.first

    def self_sources(self, place):
        return self.sources

    def cross_probabilities(self, place, probs):
        self.seen = probs
        return probs

    def cross_values(self, place, values):
        return values

    def record_self(self, place, query, key, scale):
        pass


def test_self_injection_equals_replacing_the_probabilities():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    hidden = torch.randn(3, 10, 16)  # (batch, pixels, channels)
    sources = torch.tensor([0, 0, 1])  # row 1 takes row 0's Q/K; row 2 takes row 1's
    out = P2PAttnProcessor(Handler(sources), LayerPlace("x", False, 1))(attn, hidden)

    # explicit: probabilities of the source rows, values of each row itself
    q = attn.to_q(hidden).view(3, 10, 2, 8).transpose(1, 2)
    k = attn.to_k(hidden).view(3, 10, 2, 8).transpose(1, 2)
    v = attn.to_v(hidden).view(3, 10, 2, 8).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (batch, heads, pixels, pixels)
    mixed = probs[sources] @ v
    expected = attn.to_out[0](mixed.transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", [None, 0, 2])
def test_cross_attention_matches_the_stock_processor_and_exposes_probabilities(first):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    hidden, text = torch.randn(4, 10, 16), torch.randn(4, 7, 12)
    handler = Handler(first=first)
    out = P2PAttnProcessor(handler, LayerPlace("x", True, 1))(attn, hidden, text)
    expected = AttnProcessor()(attn, hidden, text)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if first is None:  # nothing to record or edit: no explicit probabilities at all
        assert handler.seen is None
        return
    assert handler.seen.shape == (4 - first, 2, 10, 7)  # (rows from `first`, heads, pixels, tokens)
    assert handler.seen.dtype == torch.float32
    torch.testing.assert_close(handler.seen.sum(-1), torch.ones(4 - first, 2, 10))


def test_layers_are_placed_by_structure(sd1):
    places = find_places(sd1.unet)
    cross = {p.name: p.factor for p in places.values() if p.is_cross}
    assert cross["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 1
    assert cross["down_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 2
    assert cross["mid_block.attentions.0.transformer_blocks.0.attn2"] == 2
    assert cross["up_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 2
    assert cross["up_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 1
    assert len(places) == 2 * len(cross)
    assert LayerPlace("x", True, 4).map_size(64, 96) == (16, 24)
    assert LayerPlace("x", True, 2).map_size(9, 5) == (5, 3)  # stride-2 convs round up
