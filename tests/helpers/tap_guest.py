"""A "guest" holding a tap as a VMM does, in whatever network namespace it was started in
(`ip netns exec POD python -m tests.helpers.tap_guest TAP`). Commands on stdin, one a line:

    send HEX          write the frame; answers `ok`
    recv N TIMEOUT    read frames until N arrived or TIMEOUT s passed; answers their hex,
                      space-separated (an empty line when none)

It prints `ready` once the tap is open. Nothing is routed anywhere: the frames are the
test's, written to and read from the tap's fd.
"""

from __future__ import annotations

import sys
import time

from zonewatch.lab.tapfd import TapFd


def main(tap_name: str) -> None:
    with TapFd(tap_name) as tap:
        print("ready", flush=True)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "send":
                tap.write(bytes.fromhex(args[0]))
                print("ok", flush=True)
            elif cmd == "recv":
                want, deadline = int(args[0]), time.monotonic() + float(args[1])
                frames: list[str] = []
                while len(frames) < want and (left := deadline - time.monotonic()) > 0:
                    frame = tap.read(left)
                    if frame is not None:
                        frames.append(frame.hex())
                print(" ".join(frames), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
