import weakref

import numpy as np
import pytest

from hqlabel.review.render import mask_outline, overlay_masks, palette


def test_palette_colours_are_distinct():
    colours = palette(12)
    assert len(set(colours)) == 12


def test_outline_is_the_inner_boundary_of_a_square():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    outline = mask_outline(mask)
    assert outline.sum() == 6 * 4 - 4  # the ring of a 6 x 6 square
    assert not outline[3:7, 3:7].any() and not outline[~mask].any()


def test_overlay_changes_masked_pixels_only():
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:30] = True
    out = np.asarray(overlay_masks(image, [mask], alpha=0.5))
    assert np.array_equal(out[~mask], image[~mask])
    colour = np.asarray(palette(1)[0])
    assert np.allclose(out[15, 20], (image[15, 20] + colour) / 2, atol=1)  # interior: half-blended
    assert np.array_equal(out[10, 20], colour)  # outline: the colour itself


def test_overlay_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError, match="does not match"):
        overlay_masks(np.zeros((4, 4, 3), np.uint8), [np.zeros((5, 4), bool)])


def test_overlay_draws_masks_one_at_a_time_from_an_iterable():
    """Each mask is drawn and let go before the next is asked for: at most one is alive at a time."""
    image = np.full((30, 40, 3), 100, np.uint8)
    alive: list[weakref.ref] = []
    most_alive = 0

    def masks():
        nonlocal most_alive
        for k in range(5):
            mask = np.zeros((30, 40), bool)
            mask[k * 5 : k * 5 + 4, 2:30] = True
            alive.append(weakref.ref(mask))
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            yield mask
            del mask

    boxes = [(2, 0, 30, 4)] + [(5, 10, 6, 11)] * 4 + [(35, 25, 39, 29)]  # one more box than masks
    out = np.asarray(overlay_masks(image, masks(), boxes=boxes))
    assert most_alive == 1 and len(alive) == 5
    assert [tuple(out[k * 5 + 1, 10]) != (100, 100, 100) for k in range(5)] == [True] * 5  # all drawn
    assert tuple(out[0, 2]) == palette(1)[0]  # the first box in the first mask's colour
    assert tuple(out[25, 36]) == (255, 255, 255)  # a box past the last mask: white
