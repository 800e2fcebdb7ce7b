"""ddsedit.attention: which layers CDS reads, the processors put back after use, and the feature maps' sizes.

The truths these tests compare against come from diffusers itself (forward hooks on the modules,
the transformer's input shape), not from ddsedit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from ddsedit import scores
from ddsedit.attention import SelfAttentionRecorder, feature_grid, up_block_self_attention
from ddsedit.cli import app
from ddsedit.editor import Editor
from ddsedit.errors import DDSEditError

NO_DECODER_ATTENTION = "no self-attention layer (attn1) in its up blocks"
TINY_DECODER_LAYERS = {
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
}


def _unet(down: tuple[str, ...], up: tuple[str, ...], mid: str | None, channels: tuple[int, ...] = (32, 64)):
    """A small random UNet2DConditionModel with the given block types (the tiny model's sizes otherwise)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=down, up_block_types=up, mid_block_type=mid, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
    ).eval()  # fmt: skip


def _tiny_unet(folder: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def _processor_identities(unet: UNet2DConditionModel) -> dict[str, int]:
    """Every attention module's processor object, by module name (diffusers' own listing)."""
    return {name: id(processor) for name, processor in unet.attn_processors.items()}


@pytest.fixture(scope="module")
def no_decoder_attention_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a UNet that has attention in its down and mid blocks but none in its up blocks."""
    folder = tmp_path_factory.mktemp("no-decoder-attention") / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "unet")
    unet = _unet(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D"), "UNetMidBlock2DCrossAttn")
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize(
    ("down", "mid"),
    [
        (("CrossAttnDownBlock2D", "DownBlock2D"), "UNetMidBlock2DCrossAttn"),  # attention elsewhere only
        (("DownBlock2D", "DownBlock2D"), "UNetMidBlock2D"),  # no attention at all
    ],
)
def test_a_unet_without_decoder_self_attention_is_refused(down: tuple[str, ...], mid: str) -> None:
    unet = _unet(down, ("UpBlock2D", "UpBlock2D"), mid)
    assert up_block_self_attention(unet) == {}
    with pytest.raises(DDSEditError, match=r"no self-attention layer \(attn1\) in its up blocks.*cds"):
        SelfAttentionRecorder(unet)


def test_the_recorder_keeps_each_decoder_self_attention_output_and_changes_nothing(tiny_model_dir: Path) -> None:
    """The recorded features are the attn1 modules' outputs (what a forward hook sees: before the residual
    add), only the decoder's, and the UNet's output is bit-identical with and without recording."""
    unet = _tiny_unet(tiny_model_dir)
    every_attn1 = [name for name, _ in unet.named_modules() if name.endswith(".attn1")]
    assert len(every_attn1) == 4  # one in the down blocks and one in the mid block are not the decoder's
    hooked: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, output, name=name: hooked.__setitem__(name, output))
        for name, module in unet.named_modules() if name.endswith(".attn1")
    ]  # fmt: skip
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(sample, torch.tensor([300, 300]), encoder_hidden_states=text).sample
        with SelfAttentionRecorder(unet) as recorder:
            assert set(recorder.layers) == TINY_DECODER_LAYERS
            recorded = unet(sample, torch.tensor([300, 300]), encoder_hidden_states=text).sample
            outputs = dict(recorder.outputs)
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, recorded)
    assert set(outputs) == TINY_DECODER_LAYERS
    for name, output in outputs.items():
        assert output.shape == (2, 16 * 16, 32)
        assert torch.equal(output, hooked[name])


def test_processors_are_put_back_after_use_and_after_an_error(tiny_model_dir: Path) -> None:
    unet = _tiny_unet(tiny_model_dir)
    before = _processor_identities(unet)
    with SelfAttentionRecorder(unet):
        during = _processor_identities(unet)
    wrapped = {name.removesuffix(".processor") for name in before if during[name] != before[name]}
    assert wrapped == TINY_DECODER_LAYERS  # the decoder's attn1 only, while open
    assert _processor_identities(unet) == before
    with pytest.raises(RuntimeError, match="inside the block"), SelfAttentionRecorder(unet):
        raise RuntimeError("inside the block")
    assert _processor_identities(unet) == before


def test_processors_are_put_back_when_a_later_swap_fails(tiny_model_dir: Path) -> None:
    """The last layer's swap fails: the ones swapped before it are restored, and the error goes through."""
    unet = _tiny_unet(tiny_model_dir)
    before = _processor_identities(unet)
    recorder = SelfAttentionRecorder(unet)
    assert len(recorder.layers) > 1
    third = sorted(recorder.layers)[-1]  # the last swap fails, after the others

    def refuse(processor: object) -> None:
        raise RuntimeError("this layer refuses a new processor")

    recorder.layers[third].set_processor = refuse
    with pytest.raises(RuntimeError, match="refuses"), recorder:
        pass
    assert _processor_identities(unet) == before


def _picture() -> Image.Image:
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((6, 6, 24, 24), fill=(220, 40, 40))
    return image


def test_a_dds_edit_after_a_cds_edit_is_unchanged(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same Editor: DDS before and after a CDS edit (and after a CDS edit that failed mid-step) give the same bytes."""
    editor = Editor.from_pretrained(tiny_model_dir, device="cpu")
    before_processors = _processor_identities(editor.components.unet)

    def dds() -> bytes:
        config = editor.config("dds", steps=3, seed=4, lr=0.5)
        return editor.edit(_picture(), "dds", query="a blue square", ref="a red circle", config=config).image.tobytes()

    def cds() -> None:
        config = editor.config("cds", steps=2, seed=4, lr=0.5)
        editor.edit(_picture(), "cds", query="a blue square", ref="a red circle", config=config)

    first = dds()
    cds()
    assert dds() == first
    with monkeypatch.context() as patched:
        patched.setattr(scores, "patch_nce_loss", _raise)  # fails inside the recorder's block
        with pytest.raises(RuntimeError, match="broken loss"):
            cds()
    assert _processor_identities(editor.components.unet) == before_processors
    assert dds() == first


def _raise(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("broken loss")


def test_cds_on_a_unet_without_decoder_attention_fails_with_one_line(
    no_decoder_attention_model: Path, tmp_path: Path
) -> None:
    """cds (and ids with a CUT weight) need the layers; ids without CUT and pds do not, and run."""
    source = tmp_path / "circle.png"
    _picture().save(source)
    runner = CliRunner()

    def edit(method: str, *extra: str) -> object:
        return runner.invoke(app, [
            method, "--src", str(source), "--ref", "a red circle", "--query", "a blue circle", "--model",
            str(no_decoder_attention_model), "--steps", "2", "-q", "-o", str(tmp_path / f"{method}.png"), "--overwrite",
            *extra,
        ])  # fmt: skip

    for method, extra in (("cds", ()), ("ids", ("--cut-weight", "1"))):
        result = edit(method, *extra)
        assert result.exit_code == 2, (result.stdout, result.stderr)  # the model named cannot do this: exit 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and NO_DECODER_ATTENTION in lines[0] and "Traceback" not in result.stderr, lines
        assert result.stdout == "" and not (tmp_path / f"{method}.png").exists()
    for method in ("ids", "pds"):
        result = edit(method)
        assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(("height", "width"), [(15, 13), (9, 17), (5, 3), (16, 16), (11, 8), (3, 3), (2, 3)])
def test_feature_grid_places_every_decoder_layer_on_odd_latents(height: int, width: int) -> None:
    """For each decoder self-attention layer of a UNet laid out as SD 1.x's (four levels, attention in the
    decoder's last three), feature_grid gives the map size that the transformer actually received (read
    from its input), on odd, even and tiny latents (3x3: the deepest attention map is 1x1)."""
    unet = _unet(
        ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "UNetMidBlock2DCrossAttn",
        channels=(32, 32, 32, 32),
    )
    true_shapes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in unet.named_modules():
        if name.startswith("up_blocks.") and name.count(".") == 3 and ".attentions." in name:
            # A Transformer2DModel's input is the [B, C, H, W] map its attn1 tokens are the positions of.
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: true_shapes.__setitem__(name, tuple(args[0].shape[-2:]))
            ))  # fmt: skip
    with torch.no_grad(), SelfAttentionRecorder(unet) as recorder:
        unet(torch.randn(1, 4, height, width), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
        tokens = {name: output.shape[1] for name, output in recorder.outputs.items()}
    for handle in handles:
        handle.remove()
    assert len(tokens) == 6 and len(true_shapes) == 6  # three decoder levels, two layers each
    for name, positions in tokens.items():
        transformer = name.removesuffix(".transformer_blocks.0.attn1")
        assert feature_grid(positions, height, width) == true_shapes[transformer], name


def test_feature_grid_by_hand_and_its_error() -> None:
    assert feature_grid(15 * 13, 15, 13) == (15, 13)
    assert feature_grid(8 * 7, 15, 13) == (8, 7)  # ceil(15 / 2) x ceil(13 / 2)
    assert feature_grid(4 * 4, 15, 13) == (4, 4)
    assert feature_grid(1, 15, 13) == (1, 1)
    with pytest.raises(DDSEditError, match="cannot place 7 attention tokens on a 15x13 latent"):
        feature_grid(7, 15, 13)


def test_a_cds_edit_on_an_odd_latent_runs(tiny_editor: Editor) -> None:
    """A 30x26 working image gives a 15x13 latent, whose feature maps cannot be halved evenly (its steps are
    checked against the reference in test_methods.py's cds-odd-latent case)."""
    image = _picture().resize((30, 26))
    config = tiny_editor.config("cds", steps=2, seed=1, lr=0.5, size=30, keep_working_size=True)
    result = tiny_editor.edit(image, "cds", query="a blue square", ref="a red circle", config=config)
    assert result.image.size == (30, 26) and result.parameters["working_size"] == "30x26"
