"""Pure tensor maths (no Flower): aggregation rules and their helpers."""
