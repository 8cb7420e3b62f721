"""The JiT network: its module (model), attention, the op backend choice, the presets, and
resolution transfer of a trained network."""
