"""What a layer is: the spec and the facts it rests on (storage dtypes, threads)."""
