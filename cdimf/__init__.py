"""cdimf command line and orchestration: in-process engine, reproduction, simulation."""
