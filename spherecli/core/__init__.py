"""spherecli.core: file layouts, settings and plumbing below every stage."""
