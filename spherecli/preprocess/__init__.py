"""spherecli.preprocess: the first three stages: detect (with our MTCNN cascade), align, list."""
