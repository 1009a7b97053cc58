"""spherecli.recognition: a model used on photos: embedding, calibration, galleries, identification."""
