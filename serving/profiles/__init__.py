"""Engine profiles: iteration-time models fitted to measurements (the JSON files here) and their fits."""
