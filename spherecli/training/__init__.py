"""spherecli.training: training: the trainer and the margin heads."""
