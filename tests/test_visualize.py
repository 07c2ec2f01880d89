"""Figures of the visual modes: exact pixel sizes, panels where the layout puts them, raw maps saved as written."""
import numpy as np
import pytest
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from pytorch_grad_cam_vlm.visualize import (COLORBAR_HEIGHT, LABEL_HEIGHT, LABEL_POINTS, PANEL_WIDTH, TITLE_HEIGHT,
                                            comparative_positions, figure_size, figure_title, fit_text, heatmap,
                                            mode_layers, overlay, panel_layout, render, save_figure)

HEIGHT, WIDTH = 60, 120  # image 2:1, so panels are 256 x 128 pixels


def spot_maps(n_layers, height=HEIGHT, width=WIDTH):
    """Map ``k`` is a bright square at a place of its own (left to right, top to bottom), the rest zero."""
    maps = np.zeros((n_layers, height, width), dtype=np.float32)
    centres = []
    for k in range(n_layers):
        cy, cx = 15 + 30 * (k // 4), 15 + 30 * (k % 4)
        maps[k, cy - 6:cy + 6, cx - 6:cx + 6] = 1
        centres.append((cy, cx))
    return maps, centres


@pytest.fixture
def rgb():
    return np.full((HEIGHT, WIDTH, 3), 0.5, dtype=np.float32)


def panel_pixels(png, row, column, rows, image_shape=(HEIGHT, WIDTH)):
    """The pixels of one panel of a saved figure, by the layout's arithmetic."""
    panel_height = round(PANEL_WIDTH * image_shape[0] / image_shape[1])
    top = TITLE_HEIGHT + row * (LABEL_HEIGHT + panel_height) + LABEL_HEIGHT
    array = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return array[top:top + panel_height, column * PANEL_WIDTH:(column + 1) * PANEL_WIDTH]


def hottest_place(panel, image_shape=(HEIGHT, WIDTH)):
    """Where a panel is reddest (jet's hot end), in image pixels."""
    redness = panel[..., 0] - panel[..., 2]
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    return y * image_shape[0] / panel.shape[0], x * image_shape[1] / panel.shape[1]


@pytest.mark.parametrize("mode, n_layers, layout", [
    ("single", 1, (1, 2)), ("grid", 6, (2, 3)), ("grid", 4, (2, 3)), ("grid", 2, (1, 2)), ("multi", 3, (3, 2)),
    ("comparative", 3, (2, 3)),
])
def test_figure_has_the_pixel_size_of_its_layout(tmp_path, rgb, mode, n_layers, layout):
    maps, _ = spot_maps(n_layers)
    assert panel_layout(mode, n_layers) == layout
    path = save_figure(str(tmp_path / "f.png"), mode, rgb, maps, list(range(n_layers)), "GradCAM", "red")
    rows, columns = layout
    assert Image.open(path).size == figure_size(rows, columns, HEIGHT, WIDTH) == (
        columns * PANEL_WIDTH, TITLE_HEIGHT + rows * (LABEL_HEIGHT + 128) + COLORBAR_HEIGHT)


def test_grid_panels_show_each_layer_in_order(tmp_path, rgb):
    maps, centres = spot_maps(5)
    path = save_figure(str(tmp_path / "grid.png"), "grid", rgb, maps, [0, 2, 3, 5, 6], "GradCAM", "red")
    for k, (cy, cx) in enumerate(centres):
        row, column = divmod(k, 3)
        y, x = hottest_place(panel_pixels(path, row, column, rows=2))
        assert abs(y - cy) <= 6 and abs(x - cx) <= 6, k
    # the sixth place of the 2x3 grid stays empty (white)
    assert (panel_pixels(path, 1, 2, rows=2) == 255).all()


def test_multi_rows_hold_heatmap_then_overlay_of_each_layer(tmp_path, rgb):
    maps, centres = spot_maps(3)
    path = save_figure(str(tmp_path / "multi.png"), "multi", rgb, maps, [1, 2, 4], "HiResCAM", "blue")
    for k, (cy, cx) in enumerate(centres):
        heat, over = panel_pixels(path, k, 0, rows=3), panel_pixels(path, k, 1, rows=3)
        for panel in (heat, over):
            y, x = hottest_place(panel)
            assert abs(y - cy) <= 6 and abs(x - cx) <= 6, k
        # heatmap: the map alone (background is jet's blue); overlay: blended with the grey image
        assert tuple(heat[5, 5]) == tuple(heatmap(rgb, maps[k])[0, 0])
        assert abs(over[5, 5] - show_cam_on_image(rgb, maps[k], use_rgb=True)[0, 0]).max() <= 2


def test_comparative_takes_the_centre_of_each_third(tmp_path, rgb):
    assert comparative_positions(6) == [1, 3, 5]
    assert comparative_positions(7) == [1, 4, 6]
    assert mode_layers("comparative", [0, 1, 2, 4, 5, 6]) == [1, 4, 6]
    assert mode_layers("grid", [0, 3]) == [0, 3]
    with pytest.raises(ValueError, match="at least 3 layers"):
        mode_layers("comparative", [2, 4])
    with pytest.raises(ValueError, match="one layer"):
        mode_layers("single", [2, 4])
    with pytest.raises(ValueError, match="Unknown mode"):
        mode_layers("mosaic", [2, 4])


def test_titles_name_method_layers_and_target():
    assert figure_title("SmoothGradCAM", [4], " red") == "SmoothGradCAM · layer 4 · target ' red'"
    assert figure_title("GradCAM", [1, 4, 6], "red") == "GradCAM · layers 1, 4, 6 · target 'red'"


def test_render_writes_figure_maps_and_overlay(tmp_path, rgb):
    """The overlay is drawn on the image at its own size, titled with method, layer, target and check."""
    maps, _ = spot_maps(1)
    files = render(str(tmp_path), "cat", "single", rgb, maps, [5], "GradCAM", "red", notes=["top 20% off: -34.0%"])
    assert [p.rsplit("/", 1)[1] for p in files] == ["cat_GradCAM_single.png", "cat_GradCAM_maps.npy",
                                                     "cat_GradCAM_layer5_overlay.png"]
    np.testing.assert_array_equal(np.load(files[1]), maps)
    with Image.open(files[2]) as drawn:
        np.testing.assert_array_equal(np.asarray(drawn), show_cam_on_image(rgb, maps[0], use_rgb=True))
        assert drawn.text["Title"] == "GradCAM · layer 5 · target 'red' · top 20% off: -34.0%"


def test_grid_and_comparative_draw_the_chosen_layer(tmp_path, rgb):
    """Every mode draws the layer auto chose (here the projector, left out by the comparative thirds), marked."""
    assert mode_layers("grid", ["projector", 0, 3], chosen="projector") == ["projector", 0, 3]
    assert mode_layers("comparative", ["projector", 0, 1, 2, 3, 4], chosen="projector") == ["projector", 0, 2, 4]
    drawn = mode_layers("comparative", [0, 1, 2, 3, 4, 5], chosen=2)
    assert drawn == [1, 2, 3, 5] and panel_layout("comparative", len(drawn)) == (2, 4)
    maps, _ = spot_maps(4)
    path = save_figure(str(tmp_path / "c.png"), "comparative", rgb, maps, drawn, "GradCAM", "red", chosen=2)
    assert Image.open(path).size == figure_size(2, 4, HEIGHT, WIDTH)


def test_unseen_pixels_are_hatched_grey_and_labels_fit():
    """NaN (not seen by the model) shows the image greyed under hatching in both draw functions, never a map
    colour; labels wrap to two lines that fit a panel."""
    image = np.zeros((40, 40, 3), np.float32)
    image[..., 0] = 1  # pure red: its greyed version has no colour
    cam = np.full((40, 40), 0.9, np.float32)
    cam[:, :10] = np.nan
    for draw in (overlay, heatmap):
        drawn = draw(image, cam).astype(int)
        unseen_part = drawn[:, :10]
        assert (np.ptp(unseen_part, axis=-1) == 0).all()  # grey: equal channels
        assert len(np.unique(unseen_part[..., 0])) == 2  # two shades: the hatching
        assert np.ptp(drawn[:, 10:], axis=-1).max() > 50  # the map's colours where seen
    label = "middle: layer 12 (chosen) · heatmap · top 20% off: -34% · bottom: -2%"
    lines = fit_text(label, PANEL_WIDTH - 6, LABEL_POINTS).split("\n")
    assert len(lines) == 2 and " ".join(lines) == label
    assert all(len(line) * 0.56 * LABEL_POINTS * 100 / 72 <= PANEL_WIDTH - 6 for line in lines)
    assert fit_text("word " * 200, 100, 8).endswith("…")


def test_figure_refuses_maps_that_do_not_fit(tmp_path, rgb):
    maps, _ = spot_maps(2)
    with pytest.raises(ValueError, match="Expected maps"):
        save_figure(str(tmp_path / "f.png"), "grid", rgb, maps, [0, 1, 2], "GradCAM", "red")
    with pytest.raises(ValueError, match="Expected maps"):
        save_figure(str(tmp_path / "f.png"), "grid", rgb, maps[:, :30], [0, 1], "GradCAM", "red")
    assert not (tmp_path / "f.png").exists()
