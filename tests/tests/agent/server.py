# server.py WORKERS PORT [tcp|tcp6|udp|udp6]
# A preforking server: WORKERS processes, each with a socket of its own on PORT (SO_REUSEPORT),
# answering every connection (TCP: a tiny HTTP/1.0 answer) or datagram (UDP) with its pid.
# Prints the workers' pids on one line, then waits for them.
import os, socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "tcp"
v6 = mode.endswith("6")
udp = mode.startswith("udp")

def worker():
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("::" if v6 else "0.0.0.0", port))
    body = str(os.getpid()).encode()
    if udp:
        while True:
            _, peer = s.recvfrom(2048)
            s.sendto(body, peer)
    s.listen(128)
    while True:
        c, _ = s.accept()
        try:
            c.recv(1024)
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        finally:
            c.close()

pids = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        worker()
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
for p in pids:
    os.waitpid(p, 0)
