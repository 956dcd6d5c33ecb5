# client.py FIRST LAST CONNS PORT [tcp|tcp6|udp|udp6]
# From each source FIRST..LAST (127.0.0.N, or fd00::N in hex for IPv6), CONNS new connections
# (or datagrams from fresh sockets, for UDP), each answered with the serving worker's pid.
# Prints one line per source: the source and the pids.
import socket, sys
first, last, conns, port = map(int, sys.argv[1:5])
mode = sys.argv[5] if len(sys.argv) > 5 else "tcp"
v6 = mode.endswith("6")
fam = socket.AF_INET6 if v6 else socket.AF_INET
dst = "::1" if v6 else "127.0.0.1"
for i in range(first, last + 1):
    src = ("fd00::%x" % i) if v6 else ("127.0.0.%d" % i)
    pids = []
    for _ in range(conns):
        if mode.startswith("udp"):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.bind((src, 0))
            s.sendto(b"pid?", (dst, port))
            pids.append(s.recv(64).decode())
        else:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(3)
            s.bind((src, 0))
            s.connect((dst, port))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                data += d
            pids.append(data.split(b"\r\n\r\n", 1)[1].decode())
        s.close()
    print(src, " ".join(pids))
