"""The demo world: coloured shapes drawn procedurally, and SD1.5-structured models small enough to
train on a laptop CPU in a few hours, so that the whole method runs with nothing downloaded."""
