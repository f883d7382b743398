"""Phase 1's stages are declarations that chain: each reads columns the one before it writes."""

from __future__ import annotations


def test_the_stages_are_declarations_that_chain():
    """read -> generate -> score: each stage finds the columns it reads among those the one
    before it writes; the read stage is a source (it reads no column)."""
    import pytest

    from sft_ray.stages import Stage, check_chain, generate, read, score

    check_chain([read.STAGE, generate.STAGE, score.STAGE])
    assert read.STAGE.source and not generate.STAGE.source
    with pytest.raises(ValueError, match="'score' reads"):
        check_chain([read.STAGE, score.STAGE])
    orphan = Stage("orphan", object, reads=("nothing",), writes=(), wiring=lambda cfg, plan: {})
    with pytest.raises(ValueError, match="orphan"):
        check_chain([read.STAGE, orphan])
