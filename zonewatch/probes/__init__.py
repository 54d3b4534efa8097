"""The probes: BPF programs from bpf/*.c, loaded through bcc, and the decoding of their records."""
