"""The three course networks and their formula-by-formula calculations (exercises 3, 4, 11, 12, 17)."""

import pytest

from app.ml.nets import NETS, UnknownNetError, build_net, get_net
from app.ml.summary import _spatial, format_table, summarize

EXPECTED_PARAMS = {
    "net1": 193_034,
    "net2": 686_090,
    "net3": 3_267_306,
    "net4": 1_648_362,
    "net5": 1_973_944,
}


@pytest.fixture(scope="module", params=sorted(EXPECTED_PARAMS))
def summary(request):
    return summarize(request.param)


def test_registry_lists_the_three_course_nets():
    assert {"net1", "net2", "net3"} <= set(NETS)
    assert get_net("net1").title == "NET I"


def test_unknown_net_lists_known_names():
    with pytest.raises(UnknownNetError) as info:
        get_net("net9")
    assert "net1" in str(info.value) and "net9" in str(info.value)


def test_bad_builder_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_classes"):
        build_net("net1", num_classes=1)


def test_net1_and_net2_layers_in_order():
    """NET I and NET II share one builder; each keeps the layers (and names) of its exercise."""
    import keras

    # Each layer as name:parameters (pools and flatten have none), in order.
    expected = {
        "net1": "conv1:896 pool1 conv2:18496 pool2 conv3:36928 pool3 flatten fc1:131584 fc2:5130",
        "net2": "conv1:2432 conv2:51264 pool1 conv3:102464 pool2 flatten fc1:524800 fc2:5130",
    }
    kinds = {"conv": "Conv2D", "pool": "MaxPooling2D", "flatten": "Flatten", "fc": "Dense"}
    for name, layers in expected.items():
        model = build_net(name)
        assert model.name == name
        got = [
            f"{layer.name}:{layer.count_params()}" if layer.count_params() else layer.name
            for layer in model.layers
        ]
        assert " ".join(got) == layers
        assert all(
            type(layer).__name__ == kinds[layer.name.rstrip("0123456789")] for layer in model.layers
        )
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            mixed = build_net(name)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        # The softmax stays float32 under mixed precision; the rest follows the policy.
        assert [layer.dtype_policy.name for layer in mixed.layers[-2:]] == [
            "mixed_bfloat16",
            "float32",
        ]


def test_total_params_match_the_issue_and_keras(summary):
    assert summary.total_params == EXPECTED_PARAMS[summary.net]
    assert summary.keras_total_params == EXPECTED_PARAMS[summary.net]
    assert summary.trainable_params == summary.keras_trainable_params


def test_every_layer_agrees_with_keras(summary):
    disagreeing = [layer.name for layer in summary.layers if not layer.agrees]
    assert disagreeing == []
    assert summary.agrees


def test_layer_shapes_chain(summary):
    for previous, layer in zip(summary.layers, summary.layers[1:], strict=False):
        assert layer.input_shape == previous.output_shape
    assert summary.layers[-1].output_shape == [10]


def test_net1_figures_by_hand():
    s = summarize("net1")
    by_name = {layer.name: layer for layer in s.layers}
    assert by_name["conv1"].params == ((3 * 3 * 3) + 1) * 32
    assert by_name["conv1"].output_shape == [30, 30, 32]
    assert by_name["pool3"].output_shape == [2, 2, 64]
    assert by_name["fc1"].params == (256 + 1) * 512
    assert s.weight_bytes == 193_034 * 4
    # MACs: conv1 30*30*32*27 + conv2 13*13*64*288 + conv3 4*4*64*576 + fc 256*512 + 512*10
    assert s.macs_per_image == 777_600 + 3_115_008 + 589_824 + 131_072 + 5_120


def test_net3_uses_same_padding_and_says_why():
    s = summarize("net3")
    convs = [layer for layer in s.layers if layer.type == "Conv2D"]
    assert all(layer.padding == [1, 1] for layer in convs)
    assert "valid" in s.notes


def test_output_size_formula():
    assert _spatial(32, 3, 1, "valid")[0] == 30
    assert _spatial(13, 2, 2, "valid")[0] == 6  # floor((13-2)/2)+1
    assert _spatial(32, 3, 1, "same")[:2] == (32, 1)
    assert _spatial(7, 3, 2, "same")[0] == 4


def test_table_mentions_totals():
    text = format_table(summarize("net2"))
    assert "686,090" in text and "agree with Keras: yes" in text


def test_formulas_for_layers_better_nets_will_use():
    """BatchNormalization, global pooling and strided 'same' convolutions agree with Keras too."""
    import keras
    from keras import layers

    from app.ml.summary import _calc_layer

    model = keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3)),
            layers.Conv2D(16, 3, strides=2, padding="same"),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.AveragePooling2D(2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )
    shape = [32, 32, 3]
    for layer in model.layers:
        calc = _calc_layer(layer, shape)
        assert calc.params == layer.count_params(), layer.name
        assert calc.output_shape == [int(d) for d in layer.output.shape[1:]], layer.name
        shape = calc.output_shape
    bn = _calc_layer(model.layers[1], [16, 16, 16])
    assert (bn.params, bn.trainable_params) == (64, 32)


def test_net4_residual_adds_and_macs_against_net3():
    s4, s3 = summarize("net4"), summarize("net3")
    adds = [layer for layer in s4.layers if layer.type == "Add"]
    assert [a.output_shape for a in adds] == [[16, 16, 64], [4, 4, 256]]
    assert all(a.params == 0 and a.agrees for a in adds)
    assert s4.non_trainable_params == s4.keras_total_params - s4.keras_trainable_params == 2_240
    assert s4.macs_per_image == 95_259_136 and s4.macs_per_image < s3.macs_per_image
    assert get_net("net4").title == "NET IV" and "RES" in get_net("net4").layout


def test_add_formula_rejects_mismatched_shapes():
    import keras
    from keras import layers

    from app.ml.summary import _calc_layer

    a, b = keras.Input(shape=(4, 4, 8)), keras.Input(shape=(4, 4, 8))
    add = layers.Add()
    add([a, b])
    assert _calc_layer(add, [4, 4, 8], [[4, 4, 8], [4, 4, 8]]).output_shape == [4, 4, 8]
    with pytest.raises(ValueError, match="different shapes"):
        _calc_layer(add, [4, 4, 8], [[4, 4, 8], [4, 4, 16]])
