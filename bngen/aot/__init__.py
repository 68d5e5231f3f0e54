"""Ahead of time: freestanding C exported for builds and embedded targets, parameters
folded into a previous layer, and the checked-in catalogue (generated/)."""
