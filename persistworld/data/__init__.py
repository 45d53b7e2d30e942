"""Data: the pybullet mini-DROID renderer (``render``) and the dataset reader."""
