"""What each model family's networks answer by name, for the commands that hold a network of
either (``net.family``: "JiT" or "pMF"): how its config differs from a named preset."""
from jitfast.network.pmf_presets import pmf_preset_differences
from jitfast.network.presets import preset_differences

# family: preset_differences(config, name) -> {field: (config's, the preset's)}; KeyError for a
# name that is not one of the family's presets
PRESET_DIFFERENCES = {"JiT": preset_differences, "pMF": pmf_preset_differences}
