import functools, time, statistics, sys
sys.path.insert(0, '.')
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from pallas_kernels.nsa import gpu_topk, gpu_selection, gpu_flash, reference
from pallas_kernels.nsa.gpu_common import call
HQ,H,D,BS,S=28,4,128,64,32
def bench(f,*a,n=5):
    jax.block_until_ready(f(*a)); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append((time.perf_counter()-t0)*1e3)
    return statistics.median(ts)
for t in (32768, 131072):
    ks=jax.random.split(jax.random.PRNGKey(0),3)
    q=jax.random.normal(ks[0],(1,t,HQ,D),jnp.bfloat16); k=jax.random.normal(ks[1],(1,t,H,D),jnp.bfloat16)
    off=jnp.zeros((1,),jnp.int32); kc=reference.mean_pool(k,BS); nb=kc.shape[1]
    _,lse=jax.jit(functools.partial(gpu_flash.flash_fwd,mode='cmp',scale=D**-0.5,block_size=BS,window=256,interpret=False))(q,kc,kc,off)
    score=jax.jit(lambda q,kc,lse,off: call(functools.partial(gpu_topk._score_kernel,g=7,scale=D**-0.5,bs=BS),(pl.cdiv(t,64),H),jax.ShapeDtypeStruct((1,H,t,nb),jnp.float32),False,4,2,off,q,kc,lse))
    full=jax.jit(functools.partial(gpu_topk.select_blocks,block_size=BS,block_count=S,scale=D**-0.5,interpret=False))
    print(t,'score only',bench(score,q,kc,lse,off),'score+select',bench(full,q,kc,lse,off),flush=True)
    idx=full(q,kc,lse,off)
    inv=jax.jit(functools.partial(gpu_selection._inverse_index,nb=nb))
    print(t,'inverse index now',bench(inv,idx),flush=True)
    def sort1d(idx):
        b,tq,h,s=idx.shape
        key=jnp.where(idx>=0,idx,nb).transpose(0,2,1,3).reshape(b,h,tq*s)
        key=(key+jnp.arange(b*h,dtype=jnp.int32).reshape(b,h,1)*(nb+1)).reshape(-1)
        pos=lax.broadcasted_iota(jnp.int32,key.shape,0)
        return lax.sort((key,pos),num_keys=1,is_stable=True)
    def sort1d_u64(idx):
        b,tq,h,s=idx.shape
        key=jnp.where(idx>=0,idx,nb).transpose(0,2,1,3).reshape(-1).astype(jnp.uint32)
        pos=jnp.arange(key.shape[0],dtype=jnp.uint32)
        return lax.sort((key,pos),num_keys=1,is_stable=False)
    def argsort_batched(idx):
        b,tq,h,s=idx.shape
        key=jnp.where(idx>=0,idx,nb).transpose(0,2,1,3).reshape(b,h,tq*s)
        return jnp.argsort(key,axis=-1,stable=True)
    for name,f in (('sort1d stable i32 pair',sort1d),('sort1d u32 pair unstable',sort1d_u64),('argsort batched',argsort_batched)):
        jf=jax.jit(f)
        txt=jf.lower(idx).compile().as_text()
        print(t,name,bench(jf,idx),'cub' in txt.lower(),flush=True)
