"""spherecli.evaluation: evaluation: the protocol, the verification sets, metrics, reports and plots."""
