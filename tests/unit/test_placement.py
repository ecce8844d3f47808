"""init(placement=...) is checked before anything starts, with an error naming what is wrong."""

from __future__ import annotations

import pytest

from persistroids_dist.control import check_placement


@pytest.mark.parametrize("ok", [None, "spread", "pack", {"labels": {"zone": "a"}},
                                {"resources": {"cache_node": 0.01}}])
def test_accepted_placements(ok):
    check_placement(ok)


@pytest.mark.parametrize("bad", ["everywhere", "", 3, {"labels": {}}, {"labels": {"z": 1}},
                                 {"resources": {"x": 0}}, {"resources": {"x": True}},
                                 {"node": "abc"}, {"labels": {"a": "b"}, "resources": {"x": 1}}])
def test_refused_placements_name_what_was_given(bad):
    with pytest.raises(ValueError, match="placement must be") as e:
        check_placement(bad)
    assert repr(bad) in str(e.value)
