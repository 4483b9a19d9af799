#!/bin/bash
# Reader latency alone and next to a 4 KiB write+fsync writer, on a mounted blobfs:
#   bench/fsync-stall.sh MOUNTPOINT
M=$1
fio --name=prep --directory=$M --filename=r.dat --size=128M --rw=write --bs=1M --output-format=terse >/dev/null
fio --name=prep --directory=$M --filename=w.dat --size=64M --rw=write --bs=1M --output-format=terse >/dev/null
rd() { fio --name=reader --directory=$M --filename=r.dat --size=128M --rw=randread --bs=4k --direct=1 --runtime=6 --time_based --output-format=json > /tmp/reader.json; python3 -c "
import json; j=json.load(open('/tmp/reader.json'))['jobs'][0]['read']; p=j['clat_ns']['percentile']
print('$1', 'reader iops', round(j['iops']), 'p50 us', p['50.000000']//1000, 'p99 us', p['99.000000']//1000, 'p99.9 us', p['99.900000']//1000)"; }
rd alone
fio --name=w --directory=$M --filename=w.dat --size=64M --rw=randwrite --bs=4k --fsync=1 --runtime=7 --time_based --output-format=terse > /tmp/writer.txt &
rd "with-fsync-writer"
wait
awk -F';' '{print "writer (4k write + fsync each) iops", $49}' /tmp/writer.txt
