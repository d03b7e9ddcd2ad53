"""The writer process of test_second_process_reads_what_the_first_wrote: SGLang's
HiCacheController backs seeded pages up to the store members in the extra config, then
the process prints the tokens SGLang reports written and exits (its engine and host
pool go with it; the pages stay on the store node)."""

import json
import sys

from sglang_harness import HiCacheStack

spec = json.loads(sys.argv[1])
stack = HiCacheStack(mla=False, layout=spec["layout"], extra_config=spec["extra"])
pages = spec["pages"]
indices = stack.fill_pages(pages, seed=spec["seed"])
done = stack.backup(indices, list(range(1000, 1000 + pages * stack.page_size)))
stack.close()
print(json.dumps({"completed_tokens": done}), flush=True)
