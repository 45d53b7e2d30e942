"""The simulated robot world of the mini-DROID dataset: scene (table, Franka Panda, objects,
cameras) and scripted task controllers."""
