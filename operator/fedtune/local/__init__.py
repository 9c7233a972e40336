"""`fedtune run`: a whole federation as local processes over a local folder."""
